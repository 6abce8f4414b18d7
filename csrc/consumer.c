/*
** consumer.c: durable consumers in plain C. A durable subscription
** (buzz_sub with durable set) reads the committed log from its position
** (acked) a page at a time instead of the live queue; this file keeps
** that position and the page bookkeeping (page_last, page_to): which
** page comes next, where the position goes once a page is done, and
** when the position goes to the writer (save, as a BUZZ_ROW_ACK row).
**
** Invariants: a consumer has at most one page out (page_last != 0 while
** it has); its position never moves back; it goes to the writer only
** when it moved since the last time (saved), in order with the bus's
** other writes. Functions return 0 or a negative BUZZ_E* code with a
** sentence in err (BUZZ_ERR_MAX bytes).
**
** It does not know Lua: the binding (ldispatch.c's take and ack,
** lsubscribe.c, lstore.c, lbuzz.c's close) reads the page (lstore.c's
** read_page), builds the event tables, runs the prefilter and reports
** errors. It does not read the store and does not subscribe (bus.c
** does); engine.c asks it whether a consumer is behind.
*/
#include <stdio.h>
#include <string.h>

#include "engine.h"


/* ---------------------------------------------------------- positions */

int buzz__consumer_append_ack(buzz_store *s, const char *name,
                              const char *pattern, int64_t acked,
                              char *err) {
  buzz_row spec;
  buzz_row *row;
  memset(&spec, 0, sizeof spec);
  spec.kind = BUZZ_ROW_ACK;
  spec.id = acked;
  spec.ts = buzz__clock_ms();
  spec.type.p = name;
  spec.type.n = strlen(name);
  spec.key.p = pattern;
  spec.key.n = strlen(pattern);
  if ((row = buzz__row_new(&spec)) == NULL) return BUZZ_ENOMEM;
  if (buzz__store_append(s, row) < 0) {
    snprintf(err, BUZZ_ERR_MAX, "the store was opened read-only");
    return BUZZ_ESTORE;
  }
  return 0;
}

int buzz__consumer_save(buzz_store *s, buzz_sub *sub, char *err) {
  int rc;
  if (sub->acked == sub->saved) return 0;
  if ((rc = buzz__consumer_append_ack(s, sub->durable, sub->pattern,
                                      sub->acked, err)) < 0)
    return rc;
  sub->saved = sub->acked;
  return 1;
}

void buzz__consumer_save_all(buzz_engine *e) {
  char err[BUZZ_ERR_MAX];
  size_t i;
  if (e->store == NULL || e->bus.slots == NULL) return;
  for (i = 0; i < e->bus.nslots; i++)
    if (e->bus.slots[i] && e->bus.slots[i]->durable)
      buzz__consumer_save(e->store, e->bus.slots[i], err);
}

buzz_sub *buzz__consumer_find(const buzz_bus *b, const char *name) {
  size_t i;
  for (i = 0; i < b->nslots; i++) {
    buzz_sub *s = b->slots[i];
    if (s && s->durable && strcmp(s->durable, name) == 0) return s;
  }
  return NULL;
}

/* committed is a peek at the writer's (buzz__engine_sync takes its news). */
int buzz__consumer_behind(const buzz_engine *e, int64_t committed) {
  size_t i;
  if (e->ndurable == 0) return 0;
  for (i = 0; i < e->bus.nslots; i++) {
    buzz_sub *sub = e->bus.slots[i];
    if (sub && sub->durable && sub->page_last == 0 && sub->acked < committed)
      return 1;
  }
  return 0;
}


/* -------------------------------------------------------------- pages */

int buzz__consumer_is_idle(const buzz_sub *sub) {
  return sub != NULL && sub->durable != NULL && sub->page_last == 0;
}

int buzz__consumer_query(const buzz_sub *sub, int64_t committed,
                         int64_t max, buzz_query *q) {
  if (sub->acked >= committed) return 0;
  memset(q, 0, sizeof *q);
  q->after_id = sub->acked;
  q->to_id = committed;
  q->pattern.p = sub->pattern;
  q->pattern.n = sub->len;
  q->limit = max > BUZZ_PAGE_MAX ? BUZZ_PAGE_MAX : max;
  return 1;
}

int64_t buzz__consumer_page_end(const buzz_query *q, int k, int64_t bad,
                                int64_t read) {
  if (bad > 0) return bad;             /* skip that event */
  if (k < q->limit) return q->to_id;   /* read to the committed end */
  return read;
}

int buzz__consumer_skip(buzz_store *s, buzz_sub *sub, int64_t to,
                        char *err) {
  sub->acked = to;
  return buzz__consumer_save(s, sub, err);
}

void buzz__consumer_page_out(buzz_sub *sub, int64_t last, int64_t to) {
  sub->page_last = last;
  sub->page_to = to;
}

void buzz__consumer_ack(buzz_sub *sub, int64_t ev_id) {
  if (ev_id > sub->acked) sub->acked = ev_id;
  if (ev_id >= sub->page_last) {
    if (sub->page_to > sub->acked) sub->acked = sub->page_to;
    sub->page_last = 0;
  }
}
