/*
** queue.c: event records and the priority queue.
**
** Four FIFO lists, one per priority; pop takes the head of the most urgent
** non-empty list, so events leave by priority and, within a priority, in
** publish order. Push and pop are O(1).
**
** Invariants: count is the number of events on the lists (nprio[p] on
** list p); when limit is not 0, push never makes count exceed it
** (BUZZ_EFULL, and the event stays the caller's). The queue owns the events on its lists; a popped event
** belongs to the caller.
**
** It does not know about subscriptions or Lua values; an event's refs are
** released by whoever frees it (bus.c, through its on_event_free callback).
*/
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <time.h>

#include "buzz.h"

#define SPARE_MAX 256

buzz_event *buzz__event_new(buzz_queue *q) {
  buzz_event *ev = q->spare;
  if (ev != NULL) {
    q->spare = ev->next;
    q->nspare--;
  } else if ((ev = malloc(sizeof *ev)) == NULL) {
    return NULL;
  }
  ev->next = NULL;
  ev->id = ev->ts = ev->causation_id = 0;
  ev->subject = NULL;
  ev->audience = 0;
  ev->payload_ref = ev->key_ref = BUZZ_NOREF;
  ev->corr_ref = ev->headers_ref = BUZZ_NOREF;
  ev->table_ref = BUZZ_NOREF;
  ev->version = 0;
  ev->stream_ref = BUZZ_NOREF;
  ev->stream_version = 0;
  ev->priority = BUZZ_PRIO_NORMAL;
  return ev;
}

void buzz__event_free(buzz_queue *q, buzz_event *ev) {
  if (ev == NULL) return;
  if (ev->subject) buzz__subject_release(ev->subject);
  if (q->nspare < SPARE_MAX) {
    ev->next = q->spare;
    q->spare = ev;
    q->nspare++;
  } else {
    free(ev);
  }
}

void buzz__queue_free(buzz_queue *q) {
  while (q->spare) {
    buzz_event *ev = q->spare;
    q->spare = ev->next;
    free(ev);
  }
  q->nspare = 0;
}

void buzz__queue_init(buzz_queue *q, size_t limit) {
  int p;
  for (p = 0; p < BUZZ_NPRIO; p++) {
    q->head[p] = q->tail[p] = NULL;
    q->nprio[p] = 0;
  }
  q->count = 0;
  q->limit = limit;
  q->spare = NULL;
  q->nspare = 0;
}

int buzz__queue_push(buzz_queue *q, buzz_event *ev) {
  int p = ev->priority;
  if (q->limit && q->count >= q->limit) return BUZZ_EFULL;
  ev->next = NULL;
  if (q->tail[p]) q->tail[p]->next = ev;
  else q->head[p] = ev;
  q->tail[p] = ev;
  q->count++;
  BUZZ_METRIC(q->nprio[p]++);
  return BUZZ_OK;
}

buzz_event *buzz__queue_pop(buzz_queue *q) {
  int p;
  if (q->count == 0) return NULL;
  for (p = 0; p < BUZZ_NPRIO; p++) {
    buzz_event *ev = q->head[p];
    if (ev == NULL) continue;
    q->head[p] = ev->next;
    if (q->head[p] == NULL) q->tail[p] = NULL;
    ev->next = NULL;
    q->count--;
    BUZZ_METRIC(q->nprio[p]--);
    return ev;
  }
  return NULL;
}

int64_t buzz__clock_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
