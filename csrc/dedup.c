/*
** dedup.c: idempotency keys. Remembers, for a window of time, which event
** id each dedup key was first published with, so a repeated publish can
** return the original id instead of appending again.
**
** Entries sit in a hash map for lookup and in a FIFO list in insertion
** order for expiry: keys are added as events are published, so the oldest
** is always at the head, and expiry pops from the head until the head is
** young enough. Lookups and puts expire first, so memory stays bounded by
** the keys seen within one window.
**
** It does not persist anything: with a store, the keys come back from the
** events table at open (buzz__store_dedup_load).
*/
#include <stdlib.h>
#include <string.h>

#include "buzz.h"

typedef struct entry {
  struct entry *next;   /* FIFO link; owned by the list */
  int64_t id, ts;
  size_t len;
  uint32_t hash;
  char key[1];          /* len bytes + NUL; the map borrows it */
} entry;

struct buzz_dedup {
  buzz_map map;         /* key -> entry, borrows */
  entry *head, *tail;   /* owns the entries, oldest first */
  int64_t window_ms;
};

int buzz__dedup_new(buzz_dedup **out, int64_t window_ms) {
  buzz_dedup *d = calloc(1, sizeof *d);
  if (d == NULL) return BUZZ_ENOMEM;
  buzz__map_init(&d->map);
  d->window_ms = window_ms;
  *out = d;
  return BUZZ_OK;
}

void buzz__dedup_free(buzz_dedup *d) {
  if (d == NULL) return;
  while (d->head) {
    entry *e = d->head;
    d->head = e->next;
    free(e);
  }
  buzz__map_free(&d->map);
  free(d);
}

static void expire(buzz_dedup *d, int64_t now) {
  while (d->head && d->head->ts < now - d->window_ms) {
    entry *e = d->head;
    if ((d->head = e->next) == NULL) d->tail = NULL;
    if (buzz__map_get(&d->map, e->key, e->len, e->hash) == e)
      buzz__map_del(&d->map, e->key, e->len, e->hash);
    free(e);
  }
}

int64_t buzz__dedup_find(buzz_dedup *d, const char *key, size_t len,
                         int64_t now) {
  entry *e;
  expire(d, now);
  e = buzz__map_get(&d->map, key, len, buzz__map_hash(key, len));
  return e ? e->id : 0;
}

int buzz__dedup_put(buzz_dedup *d, const char *key, size_t len, int64_t id,
                    int64_t ts) {
  entry *e = malloc(sizeof *e + len);
  uint32_t h = buzz__map_hash(key, len);
  if (e == NULL) return BUZZ_ENOMEM;
  memcpy(e->key, key, len);
  e->key[len] = '\0';
  e->len = len;
  e->hash = h;
  e->id = id;
  e->ts = ts;
  e->next = NULL;
  if (buzz__map_get(&d->map, key, len, h) != NULL)   /* a newer first use */
    buzz__map_del(&d->map, key, len, h);
  if (buzz__map_put(&d->map, e->key, len, h, e) < 0) {
    free(e);
    return BUZZ_ENOMEM;
  }
  if (d->tail) d->tail->next = e;
  else d->head = e;
  d->tail = e;
  return BUZZ_OK;
}

void buzz__dedup_forget(buzz_dedup *d, int64_t lo, int64_t hi) {
  entry **link = &d->head, *e, *prev = NULL;
  while ((e = *link) != NULL) {
    if (e->id >= lo && e->id <= hi) {
      if (buzz__map_get(&d->map, e->key, e->len, e->hash) == e)
        buzz__map_del(&d->map, e->key, e->len, e->hash);
      *link = e->next;
      if (d->tail == e) d->tail = prev;
      free(e);
    } else {
      prev = e;
      link = &e->next;
    }
  }
}

size_t buzz__dedup_count(const buzz_dedup *d) {
  return d->map.count;
}
