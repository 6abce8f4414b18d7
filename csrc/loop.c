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
** Invariants: the async handle is unreferenced, so it never keeps the loop
** alive by itself; uv_loop_alive() is true only while a timer or other
** real work is armed. Handles live in malloc'd memory freed in their close
** callbacks; buzz__loop_close() runs the loop until every one has fired.
**
** It does not touch Lua, and no callback here runs Lua code.
*/
#include <stdlib.h>

#include <uv.h>

#include "buzz.h"

struct buzz_loop {
  uv_loop_t *loop;         /* owns; freed by buzz__loop_close() */
  uv_async_t *wake;        /* owns; freed in on_close() */
  unsigned is_polled : 1;  /* a host asked for the descriptor */
  unsigned is_signalled : 1;
};

static void on_wake(uv_async_t *h) {
  (void)h;                 /* only there to make the backend fd readable */
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
  *out = l;
  return BUZZ_OK;
nomem:
  free(l);
  return BUZZ_ENOMEM;
}

void buzz__loop_close(buzz_loop *l) {
  if (l == NULL) return;
  uv_close((uv_handle_t *)l->wake, on_close);
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
  uv_ref((uv_handle_t *)l->wake);
  uv_run(l->loop, UV_RUN_NOWAIT);
  uv_unref((uv_handle_t *)l->wake);
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

int buzz__loop_timeout(buzz_loop *l) {
  if (!uv_loop_alive(l->loop)) return -1;
  return uv_backend_timeout(l->loop);
}

int buzz__loop_wait(buzz_loop *l) {
  if (!uv_loop_alive(l->loop)) return 0;
  uv_run(l->loop, UV_RUN_ONCE);
  return 1;
}

uint64_t buzz__hrtime(void) {
  return uv_hrtime();
}
