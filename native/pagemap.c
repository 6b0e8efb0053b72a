/* Pagemap comparison for vmbeam-kvm: do two processes map the same physical frames?
 *
 * Reads /proc/PID/pagemap of both processes over one virtual range each (the guest RAM
 * mapping) and counts pages present in each, in both, and in both with the same PFN.
 * Done in C because an 8 GiB guest has 2 M entries per process, too slow to compare in
 * Python inside a migration's measurement window. Needs CAP_SYS_ADMIN to see PFNs. */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define CHUNK 65536

int vmbeam_compare_pagemaps(int fd_a, uint64_t vaddr_a, int fd_b, uint64_t vaddr_b,
                            uint64_t npages, uint64_t out[4])
{
    static uint64_t a[CHUNK], b[CHUNK];
    uint64_t present_a = 0, present_b = 0, both = 0, same = 0;

    for (uint64_t done = 0; done < npages;) {
        uint64_t n = npages - done < CHUNK ? npages - done : CHUNK;
        size_t len = n * sizeof(uint64_t);
        off_t off_a = (off_t)((vaddr_a / 4096 + done) * sizeof(uint64_t));
        off_t off_b = (off_t)((vaddr_b / 4096 + done) * sizeof(uint64_t));
        if (pread(fd_a, a, len, off_a) != (ssize_t)len)
            return errno ? -errno : -EIO;
        if (pread(fd_b, b, len, off_b) != (ssize_t)len)
            return errno ? -errno : -EIO;
        for (uint64_t i = 0; i < n; i++) {
            int pa = (a[i] & PM_PRESENT) != 0, pb = (b[i] & PM_PRESENT) != 0;
            present_a += pa;
            present_b += pb;
            if (pa && pb) {
                both++;
                same += (a[i] & PM_PFN_MASK) == (b[i] & PM_PFN_MASK);
            }
        }
        done += n;
    }
    out[0] = present_a;
    out[1] = present_b;
    out[2] = both;
    out[3] = same;
    return 0;
}
