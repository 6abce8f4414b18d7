/*
** loop.c: the core's own libuv loop and the pollable descriptor of the
** loop contract.
**
** The descriptor a host polls is the loop's backend fd (uv_backend_fd), the
** embedding interface libuv offers for this. While a host polls it and
** events are pending, an async handle is kept signalled so the descriptor
** stays readable; once the queue is empty the signal is consumed. Nothing
** is signalled until a host asks for the descriptor, so manual and
** built-in driving pay no system call per publish.
**
** The loop also owns one one-shot timer, armed by the Lua layer
** (buzz__loop_arm) for its own deadlines: retries, delayed events. Its
** callback only ends the loop iteration; what is due is for the Lua layer
** to find out. Re-arming replaces the due time. The timer fires only in
** buzz__loop_wait(): the non-blocking passes made for the descriptor set
** it aside, so a host that polls never has a deadline consumed unseen.
**
** Invariants: the async handle is unreferenced, so it never keeps the loop
** alive by itself; uv_loop_alive() is true only while the timer is armed
** or other real work is (a one-shot timer goes inactive when it fires).
** Handles live in malloc'd memory freed in their close callbacks;
** buzz__loop_close() runs the loop until every one has fired. Before
** the loop time is read or a timer started, it is brought up to date:
** libuv caches it between runs, and the loop may sit idle for long.
**
** It does not touch Lua, and no callback here runs Lua code.
*/
#include <limits.h>
#include <signal.h>
#include <stdlib.h>

#include <uv.h>

#include "buzz.h"

struct buzz_loop {
  uv_loop_t *loop;         /* owns; freed by buzz__loop_close() */
  uv_async_t *wake;        /* owns; freed in on_close() */
  uv_timer_t *timer;       /* owns; freed in on_close() */
  uint64_t due;            /* uv_now() the timer is due at, while armed */
  int io;                  /* servers on the loop (buzz__loop_io) */
  unsigned is_polled : 1;  /* a host asked for the descriptor */
  unsigned is_signalled : 1;
};

static void on_wake(uv_async_t *h) {
  (void)h;                 /* only there to make the backend fd readable */
}

/* The armed timer is due: end this loop iteration (a wait returns). */
static void on_timer(uv_timer_t *h) {
  uv_stop(h->loop);
}

static void on_close(uv_handle_t *h) {
  free(h);
}

int buzz__loop_new(buzz_loop **out) {
  buzz_loop *l = calloc(1, sizeof *l);
  if (l == NULL) return BUZZ_ENOMEM;
  if ((l->loop = malloc(sizeof *l->loop)) == NULL) goto nomem;
  if (uv_loop_init(l->loop) != 0) {
    free(l->loop);
    free(l);
    return BUZZ_ELOOP;
  }
  if ((l->wake = malloc(sizeof *l->wake)) == NULL) {
    uv_loop_close(l->loop);
    free(l->loop);
    goto nomem;
  }
  if (uv_async_init(l->loop, l->wake, on_wake) != 0) {
    free(l->wake);
    uv_loop_close(l->loop);
    free(l->loop);
    free(l);
    return BUZZ_ELOOP;
  }
  uv_unref((uv_handle_t *)l->wake);
  if ((l->timer = malloc(sizeof *l->timer)) == NULL) {
    buzz__loop_close(l);
    return BUZZ_ENOMEM;
  }
  uv_timer_init(l->loop, l->timer);        /* cannot fail on unix */
  *out = l;
  return BUZZ_OK;
nomem:
  free(l);
  return BUZZ_ENOMEM;
}

void buzz__loop_close(buzz_loop *l) {
  if (l == NULL) return;
  uv_close((uv_handle_t *)l->wake, on_close);
  if (l->timer) uv_close((uv_handle_t *)l->timer, on_close);  /* stops it */
  while (uv_run(l->loop, UV_RUN_NOWAIT) != 0) {}
  uv_run(l->loop, UV_RUN_NOWAIT);           /* fire the close callbacks */
  uv_loop_close(l->loop);
  free(l->loop);
  free(l);
}

/*
** One non-blocking pass of the loop with the async handle counted as
** alive. libuv adds watchers to the backend only inside uv_run, and skips
** polling when nothing keeps the loop alive; this pass registers the wake
** handle's descriptor and consumes a pending wake-up.
*/
static void loop_poll_once(buzz_loop *l) {
  int is_armed = uv_is_active((uv_handle_t *)l->timer);
  if (is_armed) uv_timer_stop(l->timer);   /* not fired by this pass */
  uv_ref((uv_handle_t *)l->wake);
  uv_run(l->loop, UV_RUN_NOWAIT);
  uv_unref((uv_handle_t *)l->wake);
  if (is_armed) {
    uint64_t now = uv_now(l->loop);
    uv_timer_start(l->timer, on_timer, l->due > now ? l->due - now : 0, 0);
  }
}

void buzz__loop_poll(buzz_loop *l) {
  loop_poll_once(l);
}

struct uv_loop_s *buzz__loop_uv(buzz_loop *l) {
  return l->loop;
}

void buzz__loop_io(buzz_loop *l, int delta) {
  l->io += delta;
}

int buzz__loop_fd(buzz_loop *l) {
  if (!l->is_polled) {
    l->is_polled = 1;
    loop_poll_once(l);                     /* register the wake handle */
  }
  return uv_backend_fd(l->loop);
}

void buzz__loop_signal(buzz_loop *l, int has_work) {
  if (!l->is_polled) return;
  if (has_work && !l->is_signalled) {
    uv_async_send(l->wake);
    l->is_signalled = 1;
  } else if (!has_work && l->is_signalled) {
    loop_poll_once(l);                     /* consumes the wake-up */
    l->is_signalled = 0;
  }
}

void buzz__loop_consume(buzz_loop *l) {
  if (l->is_polled) loop_poll_once(l);
  l->is_signalled = 0;
}

void buzz__loop_wake(buzz_loop *l) {
  uv_async_send(l->wake);                  /* thread-safe, coalesced */
}

int buzz__loop_arm(buzz_loop *l, int64_t ms) {
  if (ms < 0) {
    uv_timer_stop(l->timer);               /* idempotent */
    return BUZZ_OK;
  }
  uv_update_time(l->loop);                 /* due ms from now, not from */
  if (uv_timer_start(l->timer, on_timer, (uint64_t)ms, 0) != 0)
    return BUZZ_ELOOP;                     /* the last run */
  l->due = uv_now(l->loop) + (uint64_t)ms;
  return BUZZ_OK;
}

/*
** The timer's time left comes from its due time, not uv_backend_timeout():
** that says 0 until a run has registered the loop's watchers, and the
** loop may not have run yet.
*/
int buzz__loop_timeout(buzz_loop *l) {
  uint64_t now, left;
  if (!uv_loop_alive(l->loop)) return -1;
  if (!uv_is_active((uv_handle_t *)l->timer))
    return uv_backend_timeout(l->loop);    /* other work (none today) */
  uv_update_time(l->loop);                 /* counts down between runs */
  now = uv_now(l->loop);
  left = l->due > now ? l->due - now : 0;
  if (l->io > 0) {                         /* a server's timers too */
    int io = uv_backend_timeout(l->loop);
    if (io >= 0 && (uint64_t)io < left) left = (uint64_t)io;
  }
  return left > INT_MAX ? INT_MAX : (int)left;
}

int buzz__loop_wait(buzz_loop *l, int is_writing) {
  if (is_writing) {                        /* a commit's wake-up ends it */
    uv_update_time(l->loop);
    uv_ref((uv_handle_t *)l->wake);
    uv_run(l->loop, UV_RUN_ONCE);
    uv_unref((uv_handle_t *)l->wake);
    return 1;
  }
  if (!uv_loop_alive(l->loop)) return 0;
  uv_update_time(l->loop);                 /* wait for what is left only */
  uv_run(l->loop, UV_RUN_ONCE);
  return 1;
}

uint64_t buzz__hrtime(void) {
  return uv_hrtime();
}

/*
** A write to a peer that has gone (an HTTP client, a Redis server)
** raises SIGPIPE, whose default action ends the process (libuv writes
** with write(2), not send(MSG_NOSIGNAL)). A server must outlive its
** clients, and a client its server, as nginx and Node do: SIGPIPE is
** ignored, unless the host has a handler of its own, which stays. The
** write then fails with EPIPE and the connection closes.
*/
void buzz__ignore_sigpipe(void) {
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    sa.sa_handler = SIG_IGN;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(SIGPIPE, &sa, NULL);
  }
}
