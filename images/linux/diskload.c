/*
 * diskload: disk workload for the Linux test guest.
 *
 * Overwrites the blocks of one preallocated file (on a disk's ext4 file system) with
 * numbered, checksummed 4 KiB records, each written with O_DIRECT and made durable with
 * fdatasync() before the next, and says on the console which record is acknowledged.
 * Whoever reads the disk later (L0, after a move, a fault or a stop) can check that every
 * acknowledged record is there and intact (vmbeam_kvm/diskcheck.py).
 *
 * Record n goes to slot n % slots; a slot holds a record or the fill byte 0xa5 it was made
 * with (never a hole: overwriting in place changes no file-system metadata, so the file's
 * blocks on the disk are where its extents said they were when it was made).
 *
 * Record layout (little-endian u64s): magic "VMBBLK01", seq, slot, slots, then payload from
 * xorshift64(seed = seq), then the FNV-1a 64 of everything before it in the last 8 bytes.
 *
 * Serial protocol (LABEL: the disk's serial, so that several disks can run it):
 *   DISK LABEL scan slots=<n> valid=<v> torn=<t> last=<s>   once: what the file held
 *   DISK LABEL ack=<seq>                                      record seq is durable
 *   DISK LABEL error <call> errno=<e>                         then exit 1
 *
 * Usage: diskload FILE LABEL [period_ms]   (default 20: one record per period at most)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096
#define FILL 0xa5
#define HDR 32

#include "say.h"

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static void make(uint8_t *b, uint64_t seq, uint64_t slots)
{
    memcpy(b, "VMBBLK01", 8);
    put64(b + 8, seq);
    put64(b + 16, seq % slots);
    put64(b + 24, slots);
    uint64_t x = seq * 0x9e3779b97f4a7c15ULL | 1;
    for (size_t i = HDR; i < BLK - 8; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        put64(b + i, x);
    }
    put64(b + BLK - 8, fnv(b, BLK - 8));
}

/* 1: a record of this slot; 0: the fill; -1: anything else (torn or foreign). */
static int check(const uint8_t *b, uint64_t slot, uint64_t slots, uint64_t *seq)
{
    static uint8_t want[BLK] __attribute__((aligned(BLK)));
    if (memcmp(b, "VMBBLK01", 8) != 0) {
        for (size_t i = 0; i < BLK; i++)
            if (b[i] != FILL)
                return -1;
        return 0;
    }
    *seq = get64(b + 8);
    if (get64(b + 16) != slot || get64(b + 24) != slots)
        return -1;
    make(want, *seq, slots);
    return memcmp(b, want, BLK) == 0 ? 1 : -1;
}

static const char *label = "-";

static void die(const char *call)
{
    say("DISK %s error %s errno=%d", label, call, errno);
    exit(1);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: diskload FILE LABEL [period_ms]\n");
        return 2;
    }
    label = argv[2];
    long period_ms = argc > 3 ? atol(argv[3]) : 20;
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0)
        die("open");
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    uint64_t slots = (uint64_t)st.st_size / BLK;
    if (slots == 0) {
        errno = EINVAL;
        die("size");
    }
    static uint8_t buf[BLK] __attribute__((aligned(BLK)));
    uint64_t valid = 0, torn = 0, last = 0;
    for (uint64_t s = 0; s < slots; s++) {
        if (pread(fd, buf, BLK, (off_t)(s * BLK)) != BLK)
            die("pread");
        uint64_t seq = 0;
        int r = check(buf, s, slots, &seq);
        if (r > 0) {
            valid++;
            if (seq > last)
                last = seq;
        } else if (r < 0) {
            torn++;
        }
    }
    say("DISK %s scan slots=%llu valid=%llu torn=%llu last=%llu", label, (unsigned long long)slots,
        (unsigned long long)valid, (unsigned long long)torn, (unsigned long long)last);
    struct timespec pause = {period_ms / 1000, (period_ms % 1000) * 1000000L};
    for (uint64_t seq = last + 1;; seq++) {
        make(buf, seq, slots);
        if (pwrite(fd, buf, BLK, (off_t)((seq % slots) * BLK)) != BLK)
            die("pwrite");
        if (fdatasync(fd) < 0)
            die("fdatasync");
        say("DISK %s ack=%llu", label, (unsigned long long)seq);
        if (period_ms > 0)
            nanosleep(&pause, NULL);
    }
}
