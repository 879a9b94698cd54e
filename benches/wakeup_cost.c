// What this machine charges a process for waking a thread whose CPU has gone idle: the floor
// under the hub's CPU per message at paced rates (BENCHMARKS.md, performance round 5).
//
//   gcc -O2 -Wall -pthread -o wakeup_cost benches/wakeup_cost.c
//   ./wakeup_cost GAP_US COUNT [alone]
//
// The main thread sleeps until the next multiple of GAP_US (an absolute timer, so the gaps do
// not drift), then wakes a second thread through a pipe and waits for its answer through
// another: per round trip one timer wake-up and two thread wake-ups. GAP_US = 0 runs the round
// trips back to back, so neither thread's CPU goes idle; `alone` leaves the second thread out
// (one timer wake-up per round). Prints the process's CPU time (user + system, all threads)
// per round. `taskset -c 0` keeps both threads on one CPU.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static int to_echo[2], from_echo[2];
static long rounds;

static void *echo(void *unused) {
  (void)unused;
  char c;
  for (long i = 0; i < rounds; i++) {
    if (read(to_echo[0], &c, 1) != 1 || write(from_echo[1], &c, 1) != 1) {
      perror("echo");
      exit(1);
    }
  }
  return NULL;
}

static double cpu_seconds(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
         (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s GAP_US COUNT [alone]\n", argv[0]);
    return 2;
  }
  long gap_us = atol(argv[1]);
  rounds = atol(argv[2]);
  int alone = argc > 3;
  if (gap_us < 0 || rounds <= 0 || (alone && gap_us == 0)) {
    fprintf(stderr, "GAP_US >= 0 (> 0 with alone), COUNT > 0\n");
    return 2;
  }
  pthread_t t;
  if (!alone && (pipe(to_echo) || pipe(from_echo) || pthread_create(&t, NULL, echo, NULL))) {
    perror("setup");
    return 1;
  }
  double start = cpu_seconds();
  struct timespec next;
  clock_gettime(CLOCK_MONOTONIC, &next);
  char c = 0;
  for (long i = 0; i < rounds; i++) {
    if (gap_us > 0) {
      next.tv_nsec += gap_us * 1000;
      next.tv_sec += next.tv_nsec / 1000000000;
      next.tv_nsec %= 1000000000;
      clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    if (!alone && (write(to_echo[1], &c, 1) != 1 || read(from_echo[0], &c, 1) != 1)) {
      perror("round trip");
      return 1;
    }
  }
  if (!alone) pthread_join(t, NULL);
  const char *what = alone ? "timer wake-up"
                     : gap_us ? "round trip (1 timer + 2 thread wake-ups)"
                              : "round trip (2 thread wake-ups, back to back)";
  printf("gap %ld us: %.1f us of CPU per %s\n", gap_us, (cpu_seconds() - start) * 1e6 / rounds,
         what);
  return 0;
}
