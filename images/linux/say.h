/* say(): a line on the console, as memload and diskload print their protocol lines. */
#ifndef VMBEAM_SAY_H
#define VMBEAM_SAY_H
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

/* One write() per line so lines never interleave with other console writers. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[160];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    ssize_t r = write(1, buf, n);
    (void)r;
}

#endif
