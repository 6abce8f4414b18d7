/*
** engine.c: the publish pipeline's plain-C steps and the commit gate,
** on a buzz_engine (engine.h). A publish with a store goes: the dedup
** check (buzz__engine_duplicate), the writer's news and the id
** reservation (buzz__engine_begin), the append and, for sync
** durability or a publish_sync, the wait for its commit
** (buzz__engine_append), the queue (buzz__engine_queue, engine.h) and
** the dedup key (buzz__engine_remember). The commit gate holds queued
** events back until the writer has committed them (buzz__engine_gate
** sets it, buzz__engine_arm_gate hands it to the bus before a take,
** buzz__engine_is_due says whether anything can be handed out now);
** buzz__engine_sync takes the writer's news (the committed id, and the
** groups that failed: their events leave the queue undelivered).
**
** Invariants: an id appended to the store is used up even when the bus
** then refuses the event; a dedup key is recorded only once its event is
** published; a failed group's events are dropped from the queue and
** their dedup keys forgotten (a retry must not be a duplicate), and the
** first failure's message is the one reported. Functions return 0 or a
** negative BUZZ_E* code with a sentence in err (BUZZ_ERR_MAX bytes).
**
** It does not know Lua: the binding (lpublish.c, ldurable.c,
** ldispatch.c) reads arguments, encodes the JSON, keeps the refs, keeps
** failures for the Lua layer to report and pushes results; ctx is what the bus's on_event_free
** gets for an event dropped here. It does not deliver (bus.c does) and
** does not keep durable consumers (consumer.c does).
*/
#include <stdio.h>
#include <string.h>

#include "engine.h"


/* -------------------------------------------------- the writer's news */

typedef struct sync_ctx {
  buzz_engine *e;
  void *ctx;           /* for on_event_free */
  char *err;
  int n;
  int64_t watch;       /* an event id the caller asks about, or 0 */
  int is_lost;         /* set if watch was in a failed group */
} sync_ctx;

/* A group failed to commit: its events leave the queue, undelivered. */
static void on_store_fail(void *data, const char *msg, int64_t lo,
                          int64_t hi) {
  sync_ctx *y = (sync_ctx *)data;
  size_t dropped = lo > 0 ? buzz__bus_drop_range(&y->e->bus, lo, hi, y->ctx)
                   : 0;
  if (lo > 0 && y->e->dedup)          /* a retry must not be a duplicate */
    buzz__dedup_forget(y->e->dedup, lo, hi);
  if (y->watch >= lo && y->watch <= hi && lo > 0) y->is_lost = 1;
  if (y->n++ > 0) return;             /* the first failure tells the story */
  if (lo > 0)
    snprintf(y->err, BUZZ_ERR_MAX, "%s (events %lld to %lld were not "
             "stored%s)", msg, (long long)lo, (long long)hi,
             dropped ? " and will not be delivered" : "");
  else
    snprintf(y->err, BUZZ_ERR_MAX, "%s", msg);
}

int buzz__engine_sync(buzz_engine *e, void *ctx, int64_t watch,
                      int *is_lost, char *err) {
  sync_ctx y;
  y.e = e;
  y.ctx = ctx;
  y.err = err;
  y.n = 0;
  y.watch = watch;
  y.is_lost = 0;
  err[0] = '\0';
  buzz__store_poll(e->store, &e->committed, on_store_fail, &y);
  if (is_lost) *is_lost = y.is_lost;
  return y.n > 0 ? BUZZ_ESTORE : 0;
}


/* ------------------------------------------------------------ publish */

int64_t buzz__engine_duplicate(const buzz_engine *e, const char *key,
                               size_t len, int64_t now) {
  return e->dedup ? buzz__dedup_find(e->dedup, key, len, now) : 0;
}

int buzz__engine_remember(buzz_engine *e, const char *key, size_t len,
                          int64_t id, int64_t now) {
  if (e->dedup == NULL && buzz__dedup_new(&e->dedup, e->dedup_window) < 0)
    return BUZZ_ENOMEM;
  if (buzz__dedup_put(e->dedup, key, len, id, now) < 0) return BUZZ_ENOMEM;
  return 0;
}

/*
** Makes sure the next id (bus.last_id + 1) is reserved (ids.c), so that
** no crash can hand it out again. Returns 0, or BUZZ_ESTORE (or
** BUZZ_ENOMEM) with the reason in err: the id is then not used.
*/
static int take_id(buzz_engine *e, void *ctx, char *err) {
  char why[BUZZ_ERR_MAX];
  int rc;
  if ((rc = buzz__ids_take(e->store, e->bus.last_id + 1, &e->id_safe)) == 0)
    return 0;
  if (rc == BUZZ_ESTORE && buzz__engine_sync(e, ctx, 0, NULL, why) < 0)
    snprintf(err, BUZZ_ERR_MAX, "cannot reserve ids, so nothing was "
             "published: %.*s", BUZZ_ERR_MAX - 64, why);  /* room: head */
  else if (rc == BUZZ_ESTORE)
    snprintf(err, BUZZ_ERR_MAX, "cannot reserve ids, so nothing was "
             "published (the store is read-only, or its last reservation "
             "failed)");
  else
    snprintf(err, BUZZ_ERR_MAX, "%s", buzz__err_message(rc));
  return rc;
}

/* The hot path is one comparison: an id is reserved already. */
#define NEED_ID(e) ((e)->bus.last_id >= (e)->id_safe)

int buzz__engine_begin(buzz_engine *e, void *ctx, char *err) {
  int rc;
  if ((rc = buzz__engine_sync(e, ctx, 0, NULL, err)) < 0)
    return rc;                         /* an earlier group failed */
  if (NEED_ID(e) && (rc = take_id(e, ctx, err)) < 0) return rc;
  return 0;
}

/* The sentence for an append the store refused with rc. */
static void append_refused(buzz_engine *e, int rc, char *err) {
  buzz_store_stats st;
  if (rc != BUZZ_EFULL) {
    snprintf(err, BUZZ_ERR_MAX, "the store was opened read-only");
    return;
  }
  buzz__store_stats(e->store, &st);
  snprintf(err, BUZZ_ERR_MAX, "the store's writer is behind: %lld bytes "
           "wait to be written (max_backlog = %lld); retry when it has "
           "caught up (bus:flush() waits for that) or raise max_backlog",
           (long long)st.backlog_bytes, (long long)st.backlog_limit);
}

int buzz__engine_append(buzz_engine *e, buzz_row *spec, buzz_event *ev,
                        int is_sync, void *ctx, char *err) {
  buzz_row *row;
  int rc;
  err[0] = '\0';
  spec->kind = BUZZ_ROW_EVENT;
  spec->id = ev->id = e->bus.last_id + 1;
  if (ev->ts == 0) ev->ts = buzz__clock_ms();   /* or the caller's */
  spec->ts = ev->ts;
  spec->causation_id = ev->causation_id;
  spec->priority = ev->priority;
  spec->version = ev->version ? ev->version : 1;
  spec->stream_version = ev->stream_version;   /* 0: none */
  if ((row = buzz__row_new(spec)) == NULL) return BUZZ_ENOMEM;
  if ((rc = buzz__store_append(e->store, row)) < 0) {
    append_refused(e, rc, err);
    return rc;
  }
  e->appended_id = spec->id;
  if ((is_sync && e->durability != BUZZ_DUR_NONE) ||
      e->durability == BUZZ_DUR_SYNC) {
    int is_lost;
    buzz__store_flush(e->store);
    if ((rc = buzz__engine_sync(e, ctx, ev->id, &is_lost, err)) < 0) {
      if (is_lost) {                   /* this event: the caller is told */
        if (e->bus.last_id < ev->id) e->bus.last_id = ev->id;   /* used */
        return rc;
      }
      return 1;                        /* another group's failure */
    }
  }
  return 0;
}


/* ---------------------------------------------------- the commit gate */

int buzz__engine_is_due(buzz_engine *e) {
  int64_t committed;
  if (e->store == NULL) return buzz__bus_pending(&e->bus) > 0;
  committed = buzz__store_committed(e->store);
  if (buzz__bus_pending(&e->bus) > 0) {
    int p;
    const buzz_queue *q = &e->bus.queue;
    if (e->gate_id <= committed) return 1;
    for (p = 0; p < BUZZ_NPRIO && !q->head[p]; p++) {}
    if (p < BUZZ_NPRIO && q->head[p]->id <= committed) return 1;
  }
  return buzz__consumer_behind(e, committed);
}
