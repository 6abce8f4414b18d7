/*
** engine.h: the bus's engine state in plain C, and the two files that
** work on it without Lua: engine.c (the publish pipeline: dedup check,
** id reservation, append to the store, queue; the writer's news and the
** commit gate) and consumer.c (durable consumers' positions and pages).
** lcore.h embeds a buzz_engine in the core object; the binding files
** (l*.c) read Lua values, keep refs and push results, and call these
** for the rest. The same rules as buzz.h's: 0 or a negative BUZZ_E*
** code, buzz__ names, no Lua header.
*/
#ifndef BUZZ_ENGINE_H
#define BUZZ_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

#define BUZZ_ERR_MAX 512   /* bytes of the err buffers these functions
                              fill (always terminated) */

/*
** What a bus is made of below Lua: the dispatcher, the store, the dedup
** keys and the numbers that tie the queue to the writer's commits.
** CONSTRUCTOR: lcore_new() in lbuzz.c (bus_init, then ldurable.c's
** open_store)   DESTRUCTOR: lcore_close() in lbuzz.c
*/
typedef struct buzz_engine {
  buzz_bus bus;        /* owns; embedded */
  buzz_store *store;   /* owns; NULL for a memory bus or once closed */
  buzz_dedup *dedup;   /* owns; NULL until the first dedup key */
  int64_t dedup_window;/* ms */
  int durability;      /* BUZZ_DUR_* */
  int64_t gate_id;     /* the highest queued id that must be committed */
  int64_t committed;   /* before delivery, and the committed id last seen */
  int64_t appended_id; /* the last event id handed to the writer */
  int64_t id_safe;     /* ids up to this are reserved in the store: */
                       /* no word with it needed (buzz__ids_take) */
  size_t ndurable;     /* live durable subs */
} buzz_engine;


/* ------------------------------------------------------------ engine.c */

/*
** The writer's news: takes the committed id (into e->committed) and the
** groups that failed to commit, whose events are dropped from the queue
** (through on_event_free with ctx) and whose dedup keys are forgotten.
** Returns 0, or BUZZ_ESTORE with the first failure's message in err;
** *is_lost (if not NULL) says whether the event watch was in one.
*/
int buzz__engine_sync(buzz_engine *e, void *ctx, int64_t watch,
                      int *is_lost, char *err);

/*
** The dedup check: the id first published with key within the window
** before now (ms), or 0. buzz__engine_remember records a published
** event's key (0, or BUZZ_ENOMEM).
*/
int64_t buzz__engine_duplicate(const buzz_engine *e, const char *key,
                               size_t len, int64_t now);
int buzz__engine_remember(buzz_engine *e, const char *key, size_t len,
                          int64_t id, int64_t now);

/*
** With a store, before an append: takes the writer's news (an earlier
** group's failure refuses the publish) and makes sure the next id
** (bus.last_id + 1) is reserved (ids.c). 0, or BUZZ_ESTORE or
** BUZZ_ENOMEM with err: nothing is to be published.
*/
int buzz__engine_begin(buzz_engine *e, void *ctx, char *err);

/*
** Appends ev as the row spec (its strings filled by the caller: type,
** payload, headers, key, correlation, dedup, stream) with the next id,
** which it sets in ev, and ev's ts (the clock's when 0), causation id,
** priority, version and stream version. For sync durability, or a
** publish_sync (is_sync) with any durability but none, waits for the
** commit. Returns 0; 1 when it committed but another group failed (err
** holds that failure, for the Lua layer to report); or a negative code with err
** (empty for BUZZ_ENOMEM): BUZZ_EFULL (the writer's backlog), BUZZ_ESTORE
** (read-only, or ev's own group failed: its id is then used up).
*/
int buzz__engine_append(buzz_engine *e, buzz_row *spec, buzz_event *ev,
                        int is_sync, void *ctx, char *err);

/*
** Work a take can hand out now: queued events (with a store, once the
** commit gate lets the queue's head through) or durable consumers
** behind the committed log (consumer.c). Writes in flight are not work:
** their commit wakes the loop.
*/
int buzz__engine_is_due(buzz_engine *e);

/*
** The steps a publish or a take runs for every event, inline (the call
** would cost the hot path; bench/instructions.sh counts it).
**
** buzz__engine_is_full: with a store, is the queue full? Checked before
** the append (a memory bus's queue refuses the event itself).
*/
static inline int buzz__engine_is_full(const buzz_engine *e) {
  return e->store && e->bus.queue.limit &&
         e->bus.queue.count >= e->bus.queue.limit;
}

/*
** Queues ev (buzz__bus_publish: 1 kept, 0 freed for want of an
** audience, or a negative code, ev still the caller's). An id the store
** was given already is used up even when the bus refuses the event.
*/
static inline int buzz__engine_queue(buzz_engine *e, buzz_event *ev,
                                     const char *type, size_t len,
                                     int is_sync, size_t *level) {
  int rc = buzz__bus_publish(&e->bus, ev, type, len, is_sync, level);
  if (rc < 0 && e->store && e->bus.last_id < ev->id)
    e->bus.last_id = ev->id;           /* appended already: used up */
  return rc;
}

/*
** The commit gate. A queued event (not a publish_sync's) of a store that
** commits (durability "batch" or "sync") is delivered only once
** committed: buzz__engine_gate raises the gate to its id;
** buzz__engine_arm_gate, before each pop at level 0, tells the bus to
** hand out no event above the committed id while the gate is up.
*/
static inline void buzz__engine_gate(buzz_engine *e, int is_sync,
                                     int64_t id) {
  if (e->store && !is_sync && e->durability != BUZZ_DUR_NONE)
    e->gate_id = id;
}

static inline void buzz__engine_arm_gate(buzz_engine *e) {
  e->bus.has_gate = e->gate_id > e->committed;
  e->bus.gate = e->committed;
  e->bus.is_gated = 0;
}


/* ---------------------------------------------------------- consumer.c */

#define BUZZ_PAGE_MAX 256   /* stored events read per page */

/*
** Durable consumers' positions. buzz__consumer_append_ack gives the
** writer a position row (name, pattern, acked); buzz__consumer_save does
** it for sub if its position moved since the last time (returns 1 then,
** 0 if not); buzz__consumer_save_all for every durable sub of the bus
** (at close, errors dropped). 0 or BUZZ_ENOMEM, BUZZ_ESTORE with err.
*/
int buzz__consumer_append_ack(buzz_store *s, const char *name,
                              const char *pattern, int64_t acked,
                              char *err);
int buzz__consumer_save(buzz_store *s, buzz_sub *sub, char *err);
void buzz__consumer_save_all(buzz_engine *e);
/* The live durable sub named name on the bus, or NULL. */
buzz_sub *buzz__consumer_find(const buzz_bus *b, const char *name);
/* Is a durable sub with no page out behind committed? */
int buzz__consumer_behind(const buzz_engine *e, int64_t committed);

/*
** Pages. A durable sub reads the committed log a page at a time:
** buzz__consumer_is_idle (a durable sub with no page out),
** buzz__consumer_query (fills q with its next page, at most max and
** BUZZ_PAGE_MAX rows, up to committed; 0 when it is not behind),
** buzz__consumer_page_end (where its position goes once the page read
** as q with k rows, the last one read, or bad, an event that does not
** decode, is done), buzz__consumer_skip (a page with nothing to hand
** out: the position moves there now and goes to the writer),
** buzz__consumer_page_out (a page handed out, last its last delivery),
** buzz__consumer_ack (the delivery of ev_id ran: the position moves past
** it, and past the page's end after its last delivery).
*/
int buzz__consumer_is_idle(const buzz_sub *sub);
int buzz__consumer_query(const buzz_sub *sub, int64_t committed,
                         int64_t max, buzz_query *q);
int64_t buzz__consumer_page_end(const buzz_query *q, int k, int64_t bad,
                                int64_t read);
int buzz__consumer_skip(buzz_store *s, buzz_sub *sub, int64_t to,
                        char *err);
void buzz__consumer_page_out(buzz_sub *sub, int64_t last, int64_t to);
void buzz__consumer_ack(buzz_sub *sub, int64_t ev_id);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
