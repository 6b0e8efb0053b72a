/*
 * memload: memory workload for the Linux test guest.
 *
 * Fills touch% of MemTotal with a pattern that depends on (page, round, a
 * per-boot nonce), then forever verifies each page against the current round
 * and rewrites it for the next one; it also checks the page half a ring away,
 * so lost RAM is noticed within half a round.  Any page whose contents changed
 * behind our back (e.g. lost or zeroed during migration) makes the sticky
 * `bad` counter non-zero.  Same lines and semantics as images/testguest.
 *
 * Serial protocol (shared with the freestanding test guest):
 *   FILL <pct>%                       every 10% of the fill
 *   READY pages=<n> fill_ms=<ms>
 *   HB seq=<n> round=<r> cursor=<c> bad=<b> ok=<0|1>   every hb_ms (seq from 1)
 *
 * Usage: memload [touch-percent [hb_ms]]   (defaults 50, 100)
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define QW_PER_PAGE (PAGE / 8)
/* Checking the clock per page would dominate under TCG; 32 pages is < 1 ms. */
#define CLOCK_EVERY 32

#include "say.h"

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* splitmix64 finaliser: cheap, and never maps distinct inputs to one value. */
static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Per boot, so another guest's (or an earlier boot's) pages never match. */
static uint64_t nonce;

/*
 * Per-page seed.  Bit 0 is forced so that no qword of any pattern can be
 * zero: an all-zero page (the likely corruption) is always detected.
 */
static inline uint64_t seed(uint64_t page, uint64_t round)
{
    return mix(page * 0x100000001b3ULL ^ mix(round ^ nonce)) | 1;
}

/* qword i = seed + i*(2*odd): distinct per qword, odd (so non-zero), cheap. */
#define QW(s, i) ((s) + (uint64_t)(i) * 0xd6e8feb86659fd92ULL)

static void fill(uint64_t *p, uint64_t s)
{
    for (unsigned i = 0; i < QW_PER_PAGE; i++)
        p[i] = QW(s, i);
}

static int check(const uint64_t *p, uint64_t s)
{
    uint64_t diff = 0;
    for (unsigned i = 0; i < QW_PER_PAGE; i++)
        diff |= p[i] ^ QW(s, i);
    return diff == 0;
}

/* Reads one "<key>: <n> kB" line of /proc/meminfo; 0 if absent. */
static unsigned long meminfo_kb(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    unsigned long kb = 0;
    size_t klen = strlen(key);
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            kb = strtoul(line + klen + 1, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

int main(int argc, char **argv)
{
    int pct = argc > 1 ? atoi(argv[1]) : 50;
    long hb_ms = argc > 2 ? atol(argv[2]) : 100;
    if (pct < 1 || pct > 95 || hb_ms < 1) {
        say("memload: bad arguments (touch %d not in 1..95 or hb_ms %ld < 1)", pct, hb_ms);
        return 2;
    }
    const uint64_t hb_ns = (uint64_t)hb_ms * 1000000;
    /* AT_RANDOM: 16 kernel-provided random bytes that never block, unlike
     * getrandom() early in a TCG boot. */
    const uint8_t *rnd = (const uint8_t *)getauxval(AT_RANDOM);
    if (rnd)
        memcpy(&nonce, rnd, sizeof(nonce));
    uint64_t npages = (uint64_t)meminfo_kb("MemTotal") * 1024 / PAGE * pct / 100;
    if (npages == 0) {
        say("memload: cannot read MemTotal");
        return 1;
    }
    /* High touch values on small guests would meet the OOM killer (MemTotal
     * includes what the kernel and the initramfs already use); keep 16 MiB
     * spare instead.  READY pages= shows the real count. */
    uint64_t avail = (uint64_t)meminfo_kb("MemAvailable") * 1024 / PAGE;
    uint64_t cap = avail > 4096 ? avail - 4096 : 0;
    if (avail && npages > cap) {
        say("memload: touch %d%% capped to %llu pages (MemAvailable %llu pages)", pct,
            (unsigned long long)cap, (unsigned long long)avail);
        npages = cap;
        if (npages == 0)
            return 1;
    }
    /* No MAP_POPULATE: the fill loop faults pages in, and that is what FILL reports. */
    uint8_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        say("memload: mmap of %llu pages failed", (unsigned long long)npages);
        return 1;
    }

    uint64_t t0 = now_ns();
    int next_report = 10;
    for (uint64_t pg = 0; pg < npages; pg++) {
        fill((uint64_t *)(mem + pg * PAGE), seed(pg, 0));
        while (next_report <= 100 && (pg + 1) * 100 >= npages * (uint64_t)next_report) {
            say("FILL %d%%", next_report);
            next_report += 10;
        }
    }
    say("READY pages=%llu fill_ms=%llu", (unsigned long long)npages,
        (unsigned long long)((now_ns() - t0) / 1000000));

    uint64_t round = 0, cursor = 0, bad = 0, seq = 0;
    uint64_t last_hb = now_ns();
    for (;;) {
        for (int k = 0; k < CLOCK_EVERY; k++) {
            uint64_t *p = (uint64_t *)(mem + cursor * PAGE);
            if (!check(p, seed(cursor, round)))
                bad++;
            fill(p, seed(cursor, round + 1));
            /* Pages behind the cursor already hold round+1. */
            uint64_t far = cursor + npages / 2;
            if (far >= npages)
                far -= npages;
            if (far != cursor &&
                !check((uint64_t *)(mem + far * PAGE), seed(far, far < cursor ? round + 1 : round)))
                bad++;
            if (++cursor == npages) {
                cursor = 0;
                round++;
            }
        }
        uint64_t t = now_ns();
        /* Beat at most once per period: a guest paused for a while (e.g. by
         * migration) resumes with one line, not a burst. */
        if (t - last_hb >= hb_ns) {
            last_hb = t;
            say("HB seq=%llu round=%llu cursor=%llu bad=%llu ok=%d",
                (unsigned long long)++seq, (unsigned long long)round,
                (unsigned long long)cursor, (unsigned long long)bad, bad == 0);
        }
    }
}
