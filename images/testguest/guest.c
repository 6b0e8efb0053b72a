/*
 * guest.c - VMBEAM test guest: proves on COM1 that it keeps running and that
 * its RAM stays intact across migrations.
 *
 * It fills touch=% of RAM with a pattern derived from (page index, version,
 * boot nonce), then forever walks the pages: verify version `round`, rewrite
 * with `round + 1`.  All progress counters live in guest RAM, so after a
 * migration they continue where they were; a mismatch bumps a sticky `bad`
 * counter that every heartbeat line reports.  See README.md for the protocol.
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define PAGE            4096UL
#define QWORDS          (PAGE / 8)
#define MB_BOOT_MAGIC   0x2BADB002
#define FREE_START      (4UL << 20)     /* below: image, page tables, boot info */
#define MAPPED_END      (64UL << 30)    /* identity mapped by boot.S */
#define STATE_MAGIC     0x5642454D54475354UL
#define MAX_RUNS        32

/* ------------------------------------------------------------------ I/O -- */

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static void __attribute__((noreturn)) halt(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* --------------------------------------------------------------- serial -- */

#define COM1 0x3f8
#define COM2 0x2f8		/* ticks: see tick() */

static void serial_init(u16 port)
{
	outb(port + 1, 0x00);		/* polled: no interrupts */
	outb(port + 3, 0x80);		/* DLAB on to set the divisor */
	outb(port + 0, 0x01);		/* 115200 baud */
	outb(port + 1, 0x00);
	outb(port + 3, 0x03);		/* 8N1, DLAB off */
	outb(port + 2, 0x07);		/* FIFO on and cleared */
}

static void port_char(u16 port, char c)
{
	while (!(inb(port + 5) & 0x20))	/* THR empty */
		;
	outb(port, c);
}

static void put_char(char c)
{
	port_char(COM1, c);
}

static void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

static void put_u64(u64 v)
{
	char buf[21];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = '0' + v % 10;
		v /= 10;
	} while (v);
	put_str(&buf[i]);
}

/* ---------------------------------------------------------------- state -- */

/*
 * Everything that must survive a migration is here, in guest RAM, and is
 * accessed through volatile so the compiler never keeps it only in
 * registers.  A zeroed or foreign state block is caught by `magic` and by
 * comparing `nonce` with nonce_reg below.  `bad` counts failed checks.
 */
static volatile struct {
	u64 magic;
	u64 nonce;	/* per boot: another guest's pages never match ours */
	u64 npages;
	u64 round;
	u64 cursor;
	u64 bad;
	u64 seq;
	u64 last_hb;	/* TSC of the last heartbeat */
	u64 work;	/* steps done since boot: the guest's work rate, in ticks */
	u64 ticks;	/* ticks sent since boot */
	u64 last_tick;	/* TSC of the last tick */
} st;

/*
 * A second copy of the nonce, kept only in a CPU register (the Makefile
 * reserves r15).  Registers travel in the migration stream while RAM is
 * shared, so if the RAM we run on is not the RAM we booted with (zeroed, or
 * another guest's file), the two copies differ at the next heartbeat.
 */
register u64 nonce_reg __asm__("r15");

/* Touched pages, numbered 0..npages-1, laid out over the usable RAM runs. */
static struct run {
	u64 first;	/* index of the run's first page */
	u64 base;	/* its physical (= virtual) address */
	u64 npages;
} runs[MAX_RUNS];
static int nruns;

/*
 * Whole pages are verified when TCG is fast enough for it (it is, by a wide
 * margin, on a typical host); otherwise a sample of qwords.  Sparse checks a
 * subset of the full pattern, so switching full -> sparse mid-way is safe.
 */
static int full_pages = 1;
static int mode_forced;		/* verify= on the command line */
#ifndef FULL_BUDGET_NS
#define FULL_BUDGET_NS	16000	/* per page: keeps 1.4 GiB well under 10 s */
#endif
static u64 tsc_per_ms;

static volatile u64 *page_ptr(u64 idx)
{
	for (int i = 0; i < nruns; i++)
		if (idx - runs[i].first < runs[i].npages)
			return (volatile u64 *)(runs[i].base + (idx - runs[i].first) * PAGE);
	halt();			/* unreachable for idx < npages */
}

/* -------------------------------------------------------------- pattern -- */

/*
 * Qword j of page idx at version ver is (seed + j * K) | 1: a per-page hash
 * plus a cheap per-qword step.  The |1 makes all-zero memory never match,
 * even if the state block itself (and with it the nonce) was zeroed.
 */
#define STEP_K 0xD6E8FEB86659FD93UL

/* Sparse mode: first, last and every 64th qword in between. */
static const u16 sample_qw[] = { 0, 64, 128, 192, 256, 320, 384, 448, 511 };
#define NSAMPLES (sizeof(sample_qw) / sizeof(sample_qw[0]))

static u64 page_seed(u64 idx, u64 ver)
{
	u64 h = st.nonce ^ (idx * 0x9E3779B97F4A7C15UL) ^ (ver * 0xC2B2AE3D27D4EB4FUL);

	h ^= h >> 31;
	h *= 0xBF58476D1CE4E5B9UL;
	h ^= h >> 29;
	return h;
}

static void write_page(u64 idx, u64 ver)
{
	volatile u64 *p = page_ptr(idx);
	u64 s = page_seed(idx, ver);

	if (full_pages) {
		for (u64 j = 0; j < QWORDS; j++, s += STEP_K)
			p[j] = s | 1;
	} else {
		for (u64 i = 0; i < NSAMPLES; i++)
			p[sample_qw[i]] = (s + sample_qw[i] * STEP_K) | 1;
	}
}

static int page_ok(u64 idx, u64 ver)
{
	volatile u64 *p = page_ptr(idx);
	u64 s = page_seed(idx, ver);
	u64 diff = 0;

	if (full_pages) {
		for (u64 j = 0; j < QWORDS; j++, s += STEP_K)
			diff |= p[j] ^ (s | 1);
	} else {
		for (u64 i = 0; i < NSAMPLES; i++)
			diff |= p[sample_qw[i]] ^ ((s + sample_qw[i] * STEP_K) | 1);
	}
	return diff == 0;
}

/* ------------------------------------------------------------- boot info -- */

struct mb_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline;
	u32 mods_count, mods_addr, syms[4];
	u32 mmap_length, mmap_addr;
};

struct mb_mmap {
	u32 size;	/* of the rest of the entry, excluding this field */
	u64 base, len;
	u32 type;
} __attribute__((packed));

static u64 touch_pct = 70, hb_ms = 100, tick_us = 1000;

static int parse_u64(const char *s, u64 *out)
{
	u64 v = 0;

	if (*s < '0' || *s > '9')
		return 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	if (*s && *s != ' ')
		return 0;
	*out = v;
	return 1;
}

static int has_prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

/* QEMU passes "<kernel path> <-append string>"; look at each word. */
static void parse_cmdline(const char *s)
{
	u64 v;

	while (*s) {
		const char *w;

		while (*s == ' ')
			s++;
		w = s;
		while (*s && *s != ' ')
			s++;
		if (has_prefix(w, "touch=") && parse_u64(w + 6, &v))
			touch_pct = v > 95 ? 95 : v;
		else if (has_prefix(w, "hb_ms=") && parse_u64(w + 6, &v))
			hb_ms = v < 1 ? 1 : v;
		else if (has_prefix(w, "tick_us=") && parse_u64(w + 8, &v))
			tick_us = v;
		else if (has_prefix(w, "verify=full"))
			full_pages = mode_forced = 1;
		else if (has_prefix(w, "verify=sparse"))
			full_pages = 0, mode_forced = 1;
	}
}

static void add_run(u64 base, u64 len, u64 *avail)
{
	u64 start = base < FREE_START ? FREE_START : base;
	u64 end = base + len > MAPPED_END ? MAPPED_END : base + len;

	start = (start + PAGE - 1) & ~(PAGE - 1);
	end &= ~(PAGE - 1);
	if (start >= end || nruns == MAX_RUNS)
		return;
	runs[nruns].first = *avail;
	runs[nruns].base = start;
	runs[nruns].npages = (end - start) / PAGE;
	*avail += runs[nruns].npages;
	nruns++;
}

/* Returns total usable RAM in bytes and records the runs we may scribble on. */
static u64 scan_memory(const struct mb_info *mbi, u64 *avail)
{
	u64 total = 0;

	*avail = 0;
	if (mbi->flags & (1 << 6)) {
		u64 p = mbi->mmap_addr, end = p + mbi->mmap_length;

		while (p < end) {
			const struct mb_mmap *e = (const struct mb_mmap *)p;

			if (e->type == 1) {
				total += e->len;
				add_run(e->base, e->len, avail);
			}
			p += e->size + 4;
		}
	} else if (mbi->flags & 1) {
		total = ((u64)mbi->mem_lower + mbi->mem_upper) << 10;
		add_run(1UL << 20, (u64)mbi->mem_upper << 10, avail);
	}
	return total;
}

/* -------------------------------------------------------------- timing -- */

/*
 * Count TSC ticks across 50 ms of PIT channel 2 (gated through port 0x61, so
 * no interrupts are needed).  Under TCG both the PIT and the TSC follow host
 * time, which is what the heartbeat rate is about.
 */
static void calibrate_tsc(void)
{
	const u32 count = 59659;	/* 1193182 Hz * 50 ms */
	u64 t0, t1, spins = 0;

	outb(0x61, (inb(0x61) & ~0x02) | 0x01);	/* gate on, speaker off */
	outb(0x43, 0xB0);			/* ch 2, lo/hi byte, mode 0 */
	outb(0x42, count & 0xff);
	outb(0x42, count >> 8);
	t0 = rdtsc();
	while (!(inb(0x61) & 0x20) && ++spins < 100000000UL)
		;
	t1 = rdtsc();
	tsc_per_ms = (t1 - t0) / 50;
	if (spins >= 100000000UL || tsc_per_ms == 0)
		tsc_per_ms = 2000000;		/* no PIT? assume 2 GHz */
}

/* ------------------------------------------------------------ main loop -- */

static void heartbeat(void)
{
	if (st.magic != STATE_MAGIC || st.nonce != nonce_reg)
		st.bad++;
	st.seq++;
	put_str("HB seq=");
	put_u64(st.seq);
	put_str(" round=");
	put_u64(st.round);
	put_str(" cursor=");
	put_u64(st.cursor);
	put_str(" bad=");
	put_u64(st.bad);
	put_str(st.bad ? " ok=0\n" : " ok=1\n");
}

/*
 * COM2 carries ticks for a pause meter on the host: one byte ('.') every
 * tick_us of guest time, and every 10th tick instead a line "w<hex>\n"
 * with the number of steps done since boot.  The host timestamps each byte
 * as it arrives, so the longest gap between bytes is the pause the guest
 * saw, and work over host time is the guest's work rate.  After a pause
 * the guest sends one tick, not a catch-up burst.
 */
static void tick(void)
{
	static const char hex[] = "0123456789abcdef";

	if (++st.ticks % 10) {
		port_char(COM2, '.');
		return;
	}
	port_char(COM2, 'w');
	for (int sh = 60; sh >= 0; sh -= 4)
		if (st.work >> sh || !sh)
			port_char(COM2, hex[(st.work >> sh) & 15]);
	port_char(COM2, '\n');
}

/*
 * One mutation step.  Besides the cursor page, check the page half a ring
 * away, which was last written long ago: lost RAM is noticed within half a
 * round instead of one.
 */
static void step(void)
{
	u64 c = st.cursor, r = st.round, n = st.npages;
	u64 far = c + n / 2;

	if (!page_ok(c, r))
		st.bad++;
	write_page(c, r + 1);

	if (far >= n)
		far -= n;
	if (far != c && !page_ok(far, far < c ? r + 1 : r))
		st.bad++;

	if (++c == n) {
		c = 0;
		st.round = r + 1;
	}
	st.cursor = c;
	st.work++;
}

void guest_main(u32 magic, u32 mbi_addr)
{
	const struct mb_info *mbi = (const struct mb_info *)(u64)mbi_addr;
	u64 total, avail, want, t0, hb_ticks, tick_ticks;

	serial_init(COM1);
	serial_init(COM2);
	if (magic != MB_BOOT_MAGIC) {
		put_str("VMBEAM-TESTGUEST error: not started by a multiboot loader\n");
		halt();
	}
	/* Boot info sits just above our image, below FREE_START; read it all now. */
	if (mbi->flags & (1 << 2))
		parse_cmdline((const char *)(u64)mbi->cmdline);
	total = scan_memory(mbi, &avail);

	want = total / 100 * touch_pct / PAGE;
	st.npages = want < avail ? want : avail;
	nonce_reg = rdtsc() * 0x9E3779B97F4A7C15UL;
	st.nonce = nonce_reg;
	st.magic = STATE_MAGIC;

	put_str("VMBEAM-TESTGUEST boot mem=");
	put_u64(total);
	put_str(" touch=");
	put_u64(touch_pct);
	put_str(" pages=");
	put_u64(st.npages);
	put_str("\n");

	calibrate_tsc();

	t0 = rdtsc();
	for (u64 tenth = 1, i = 0; tenth <= 10; tenth++) {
		for (u64 end = st.npages * tenth / 10; i < end; i++)
			write_page(i, 0);
		/* Host too slow for whole pages?  Decide on the first tenth. */
		if (tenth == 1 && i && !mode_forced &&
		    (rdtsc() - t0) * 1000000 / tsc_per_ms / i > FULL_BUDGET_NS)
			full_pages = 0;
		put_str("FILL ");
		put_u64(tenth * 10);
		put_str("%\n");
	}
	put_str("READY pages=");
	put_u64(st.npages);
	put_str(" fill_ms=");
	put_u64((rdtsc() - t0) / tsc_per_ms);
	put_str("\n");

	hb_ticks = hb_ms * tsc_per_ms;
	tick_ticks = tick_us * tsc_per_ms / 1000;
	st.last_hb = st.last_tick = rdtsc();
	for (;;) {
		if (st.npages)
			step();
		u64 now = rdtsc();
		if (tick_ticks && now - st.last_tick >= tick_ticks) {
			st.last_tick = now;
			tick();
		}
		/* Unsigned difference: a TSC that went backwards beats at once. */
		if (now - st.last_hb >= hb_ticks) {
			st.last_hb = now;
			heartbeat();
		}
	}
}
