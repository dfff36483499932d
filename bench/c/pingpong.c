/*
 * B1's physical limit: a KVMI CR event and its reply ping-ponged between two processes over a Unix
 * socket pair, in C, nothing decoded. Built by bench/run.mjs with the system `cc` into a temporary
 * directory; the frames come from files the bench writes with @periscope/kvmi's encoders, so the bytes
 * are exactly those the simulator and the raw responder exchange in B1 (an 8 + 552 + 24-byte CR event,
 * a 24 + 8-byte reply).
 *
 *   pingpong <event-frame-file> <reply-frame-file> <rounds>
 *
 * The parent plays KVM: it patches the seq into the event, writes it, and reads the whole reply. The
 * child plays the raw responder: it reads one whole frame (8-byte header + size), copies the reply
 * template, patches the seq and copies the event's old value into new_val (a deny), and writes it.
 * Round trips are timed with CLOCK_MONOTONIC; the first 10% are dropped as warm-up. One JSON line out:
 *   {"rounds":N,"n":M,"p50":us,"p99":us,"min":us,"max":us}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CR_EVENT_OLD_VALUE (8 + 552 + 8) /* frame header + kvmi_vcpu_event (arch) + cr, padding */

static void die(const char *what) {
  fprintf(stderr, "pingpong: %s: %s\n", what, errno ? strerror(errno) : "failed");
  exit(2);
}

static uint8_t *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) die(path);
  uint8_t *b = malloc(65536);
  if (!b) die("malloc");
  *len = fread(b, 1, 65536, f);
  fclose(f);
  if (*len < 8) { errno = 0; die("frame file too short"); }
  return b;
}

static void read_full(int fd, uint8_t *b, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, b + got, n - got);
    if (r > 0) got += (size_t)r;
    else if (r == 0) exit(0); /* the other side is done */
    else if (errno != EINTR) die("read");
  }
}

static void write_full(int fd, const uint8_t *b, size_t n) {
  size_t put = 0;
  while (put < n) {
    ssize_t w = write(fd, b + put, n - put);
    if (w > 0) put += (size_t)w;
    else if (errno != EINTR) die("write");
  }
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 4) { errno = 0; die("usage: pingpong <event-frame-file> <reply-frame-file> <rounds>"); }
  size_t ev_len, rep_len;
  uint8_t *ev = slurp(argv[1], &ev_len);
  uint8_t *rep = slurp(argv[2], &rep_len);
  int rounds = atoi(argv[3]);
  if (rounds < 10) { errno = 0; die("rounds must be >= 10"); }
  if (ev_len < CR_EVENT_OLD_VALUE + 16 || rep_len < 16) { errno = 0; die("not a CR event / reply frame"); }
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) die("socketpair");
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    /* The responder: whole frames in, the reply template out (seq and new_val patched). */
    close(sv[0]);
    uint8_t *in = malloc(65536), *out = malloc(rep_len);
    if (!in || !out) die("malloc");
    for (;;) {
      read_full(sv[1], in, 8);
      uint16_t size;
      memcpy(&size, in + 2, 2);
      read_full(sv[1], in + 8, size);
      memcpy(out, rep, rep_len);
      memcpy(out + 4, in + 4, 4);                             /* seq */
      memcpy(out + rep_len - 8, in + CR_EVENT_OLD_VALUE, 8);  /* new_val = the old value: deny */
      write_full(sv[1], out, rep_len);
    }
  }
  close(sv[1]);
  double *us = malloc(sizeof(double) * (size_t)rounds);
  uint8_t *back = malloc(rep_len);
  if (!us || !back) die("malloc");
  for (int i = 0; i < rounds; i++) {
    uint32_t seq = (uint32_t)i + 1;
    memcpy(ev + 4, &seq, 4);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    write_full(sv[0], ev, ev_len);
    read_full(sv[0], back, rep_len);
    clock_gettime(CLOCK_MONOTONIC, &b);
    uint32_t got;
    memcpy(&got, back + 4, 4);
    if (got != seq) { errno = 0; die("reply seq mismatch"); }
    us[i] = (double)(b.tv_sec - a.tv_sec) * 1e6 + (double)(b.tv_nsec - a.tv_nsec) / 1e3;
  }
  close(sv[0]);
  waitpid(pid, NULL, 0);
  int skip = rounds / 10, n = rounds - skip;
  qsort(us + skip, (size_t)n, sizeof(double), cmp);
  double *s = us + skip;
  int i99 = (int)(0.99 * n);
  if (i99 >= n) i99 = n - 1;
  printf("{\"rounds\":%d,\"n\":%d,\"p50\":%.2f,\"p99\":%.2f,\"min\":%.2f,\"max\":%.2f}\n", rounds, n, s[n / 2], s[i99], s[0], s[n - 1]);
  return 0;
}
