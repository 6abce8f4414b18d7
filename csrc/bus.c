/*
** bus.c: the dispatcher. It ties the trie and the queue together: it owns
** the subscriptions, assigns ids, fixes each event's audience when it is
** published and hands out deliveries one at a time through cursors.
**
** Invariants:
** - Event ids increase by one per accepted publish; a refused publish
**   (EFULL, ENOMEM) consumes none.
** - An event's audience is the subs that match its type and whose seq is at
**   most ev->audience (the last seq when it was published), minus those
**   unsubscribed before their delivery is handed out.
** - Level 0 delivers queued events; level k > 0 belongs to the k-th nested
**   publish_sync and is popped when its event has been handed to everyone.
**   Every event on a cursor has all its deliveries handed out before the
**   cursor moves on, so events published meanwhile come after it.
** - With has_gate, level 0 takes no event with an id above gate from the
**   queue (a store's committed id): it returns 0 and sets is_gated.
** - With has_below, level 0 takes from the queue only events more urgent
**   than below (a take that preempts the rest of a batch): a delivery a
**   filter skips never lets it go on to a less urgent event.
** - A sub's memory lives while any match vector lists it, so a sub handed
**   out for delivery stays valid until its cursor moves on, even if it was
**   unsubscribed in between.
**
** It does not run handlers or know Lua: it calls on_event_free(ctx, ev)
** when an event leaves the bus, so lbuzz.c can drop its refs.
*/
#include <stdlib.h>
#include <string.h>

#include "buzz.h"

void buzz__sub_free(buzz_sub *sub) {
  free(sub->pattern);
  free(sub->durable);
  free(sub);
}

static void sub_release(buzz_sub *sub) {
  if (--sub->refcount == 0) buzz__sub_free(sub);
}

void buzz__sub_hold(buzz_sub *sub) {
  sub->refcount++;
}

void buzz__sub_release(buzz_sub *sub) {
  sub_release(sub);
}

int buzz__bus_init(buzz_bus *b, size_t queue_limit) {
  memset(b, 0, sizeof *b);
  b->is_closed = 1;                      /* until fully acquired */
  buzz__queue_init(&b->queue, queue_limit);
  if ((b->trie = buzz__trie_new()) == NULL) return BUZZ_ENOMEM;
  if ((b->cursors = calloc(4, sizeof *b->cursors)) == NULL) {
    buzz__trie_free(b->trie);
    b->trie = NULL;
    return BUZZ_ENOMEM;
  }
  b->cap = 4;
  b->depth = 1;
  b->is_closed = 0;
  return BUZZ_OK;
}

static void cursor_finish(buzz_bus *b, buzz_cursor *c, void *ctx) {
  if (c->ev) {
    if (b->on_event_free) b->on_event_free(ctx, c->ev);
    buzz__event_free(&b->queue, c->ev);
    c->ev = NULL;
  }
  buzz__matchvec_release(c->vec);
  c->vec = NULL;
  c->i = 0;
}

size_t buzz__bus_close(buzz_bus *b, void *ctx) {
  size_t n = 0, i;
  buzz_event *ev;
  if (b->is_closed) return 0;
  b->is_closed = 1;
  for (i = 0; i < b->depth; i++) cursor_finish(b, &b->cursors[i], ctx);
  while ((ev = buzz__queue_pop(&b->queue)) != NULL) {
    if (b->on_event_free) b->on_event_free(ctx, ev);
    buzz__event_free(&b->queue, ev);
    n++;
  }
  for (i = 0; i < b->nslots; i++) {
    buzz_sub *sub = b->slots[i];
    if (sub == NULL) continue;
    sub->is_dead = 1;
    buzz__trie_remove(b->trie, sub);
    b->slots[i] = NULL;
    sub_release(sub);
  }
  buzz__queue_free(&b->queue);
  buzz__trie_free(b->trie);     /* releases cached vectors and their subs */
  b->trie = NULL;
  free(b->slots);
  free(b->free_slots);
  free(b->cursors);
  b->slots = NULL;
  b->free_slots = NULL;
  b->cursors = NULL;
  b->nslots = b->nfree = b->nsubs = b->depth = b->cap = 0;
  return n;
}

static int slot_take(buzz_bus *b, size_t *out) {
  if (b->nfree == 0) {
    size_t ncap = b->nslots ? b->nslots * 2 : 8, i;
    buzz_sub **ns;
    size_t *nf;
    if ((ns = realloc(b->slots, ncap * sizeof *ns)) == NULL)
      return BUZZ_ENOMEM;
    b->slots = ns;
    if ((nf = realloc(b->free_slots, ncap * sizeof *nf)) == NULL)
      return BUZZ_ENOMEM;
    b->free_slots = nf;
    for (i = ncap; i > b->nslots; i--) {    /* lowest index on top */
      b->slots[i - 1] = NULL;
      b->free_slots[b->nfree++] = i - 1;
    }
    b->nslots = ncap;
  }
  *out = b->free_slots[--b->nfree];
  return BUZZ_OK;
}

int buzz__bus_subscribe(buzz_bus *b, const char *pattern, size_t len,
                        int is_once, int data_ref, buzz_sub **out) {
  buzz_sub *sub;
  size_t slot;
  int rc;
  if (b->is_closed) return BUZZ_ECLOSED;
  if ((sub = calloc(1, sizeof *sub)) == NULL) return BUZZ_ENOMEM;
  if ((sub->pattern = malloc(len + 1)) == NULL) {
    free(sub);
    return BUZZ_ENOMEM;
  }
  memcpy(sub->pattern, pattern, len);
  sub->pattern[len] = '\0';
  sub->len = len;
  sub->is_once = is_once != 0;
  sub->data_ref = data_ref;
  sub->filter_ref = BUZZ_NOREF;
  sub->refcount = 1;
  if ((rc = slot_take(b, &slot)) < 0) {
    buzz__sub_free(sub);
    return rc;
  }
  if ((rc = buzz__trie_insert(b->trie, sub)) < 0) {
    b->free_slots[b->nfree++] = slot;   /* give the slot back */
    buzz__sub_free(sub);
    return rc;
  }
  sub->slot = slot;
  sub->seq = ++b->last_seq;
  b->slots[slot] = sub;
  b->nsubs++;
  *out = sub;
  return BUZZ_OK;
}

int buzz__bus_unsubscribe(buzz_bus *b, buzz_sub *sub) {
  if (sub->is_dead || b->is_closed) return 0;
  sub->is_dead = 1;
  buzz__trie_remove(b->trie, sub);
  b->slots[sub->slot] = NULL;
  b->free_slots[b->nfree++] = sub->slot;
  b->nsubs--;
  sub_release(sub);
  return 1;
}

buzz_sub *buzz__bus_sub(const buzz_bus *b, int64_t id) {
  if (id < 1 || (uint64_t)id > b->nslots) return NULL;
  return b->slots[id - 1];
}

size_t buzz__bus_pending(const buzz_bus *b) {
  return b->queue.count;
}

static int cursor_push(buzz_bus *b, buzz_event *ev, buzz_matchvec *vec,
                       size_t *level) {
  buzz_cursor *c;
  if (b->depth == b->cap) {
    size_t ncap = b->cap * 2;
    buzz_cursor *nc = realloc(b->cursors, ncap * sizeof *nc);
    if (nc == NULL) return BUZZ_ENOMEM;
    b->cursors = nc;
    b->cap = ncap;
  }
  c = &b->cursors[b->depth];
  c->ev = ev;
  c->vec = vec;
  c->i = 0;
  vec->refcount++;
  *level = b->depth++;
  return BUZZ_OK;
}

int buzz__bus_publish(buzz_bus *b, buzz_event *ev, const char *type,
                      size_t len, int is_sync, size_t *level) {
  buzz_subject *subject;
  buzz_matchvec *vec;
  int rc;
  if (b->is_closed) return BUZZ_ECLOSED;
  if (!is_sync && b->queue.limit && b->queue.count >= b->queue.limit)
    return BUZZ_EFULL;
  if ((subject = buzz__trie_subject(b->trie, type, len)) == NULL)
    return BUZZ_ENOMEM;
  if ((rc = buzz__trie_match(b->trie, subject, &vec)) < 0) {
    buzz__subject_release(subject);
    return rc;
  }
  if (ev->id == 0) ev->id = b->last_id + 1;   /* or preset by a store */
  if (ev->ts == 0) ev->ts = buzz__clock_ms();
  if (vec->n == 0) {                 /* nobody to tell: accept and drop */
    buzz__subject_release(subject);
    b->last_id = ev->id;
    buzz__event_free(&b->queue, ev);
    return 0;
  }
  ev->subject = subject;
  if (is_sync) {
    if ((rc = cursor_push(b, ev, vec, level)) < 0) {
      ev->subject = NULL;
      buzz__subject_release(subject);
      return rc;
    }
  } else if ((rc = buzz__queue_push(&b->queue, ev)) < 0) {
    ev->subject = NULL;
    buzz__subject_release(subject);
    return rc;
  }
  b->last_id = ev->id;
  ev->audience = b->last_seq;
  return 1;
}

size_t buzz__bus_drop_range(buzz_bus *b, int64_t lo, int64_t hi, void *ctx) {
  size_t n = 0;
  int p;
  if (b->is_closed) return 0;
  for (p = 0; p < BUZZ_NPRIO; p++) {
    buzz_event **link = &b->queue.head[p], *ev, *prev = NULL;
    while ((ev = *link) != NULL) {
      if (ev->id >= lo && ev->id <= hi) {
        *link = ev->next;
        if (b->queue.tail[p] == ev) b->queue.tail[p] = prev;
        b->queue.count--;
        BUZZ_METRIC(b->queue.nprio[p]--);
        if (b->on_event_free) b->on_event_free(ctx, ev);
        buzz__event_free(&b->queue, ev);
        n++;
      } else {
        prev = ev;
        link = &ev->next;
      }
    }
  }
  return n;
}

int buzz__bus_next(buzz_bus *b, size_t level, buzz_sub **sub,
                   buzz_event **ev, void *ctx) {
  buzz_cursor *c;
  if (b->is_closed || level >= b->depth) return 0;
  while (b->depth - 1 > level)        /* levels abandoned by an error */
    cursor_finish(b, &b->cursors[--b->depth], ctx);
  c = &b->cursors[level];
  for (;;) {
    if (c->ev == NULL) {
      buzz_event *next;
      int rc;
      if (level > 0) {
        b->depth--;
        return 0;
      }
      if (b->has_gate) {                /* a store: committed ones only */
        int p;
        for (p = 0; p < BUZZ_NPRIO && !b->queue.head[p]; p++) {}
        if (p < BUZZ_NPRIO && b->queue.head[p]->id > b->gate) {
          b->is_gated = 1;
          return 0;
        }
      }
      if (b->has_below) {
        int p;
        for (p = 0; p < BUZZ_NPRIO && !b->queue.head[p]; p++) {}
        if (p >= b->below) return 0;
      }
      if ((next = buzz__queue_pop(&b->queue)) == NULL) return 0;
      c->ev = next;
      c->i = 0;
      if ((rc = buzz__trie_match(b->trie, next->subject, &c->vec)) < 0) {
        c->vec = NULL;
        cursor_finish(b, c, ctx);      /* cannot know its audience */
        return rc;
      }
      c->vec->refcount++;
    }
    while (c->i < c->vec->n) {
      buzz_sub *s = c->vec->subs[c->i++];
      if (s->is_dead || s->seq > c->ev->audience || s->durable) continue;
      if (s->filter_ref != BUZZ_NOREF && b->accept &&
          !b->accept(ctx, s, c->ev))
        continue;
      if (s->is_once) buzz__bus_unsubscribe(b, s);
      *sub = s;
      *ev = c->ev;
      return 1;
    }
    cursor_finish(b, c, ctx);
  }
}
