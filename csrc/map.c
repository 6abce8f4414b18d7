/*
** map.c: an open-addressing hash map from byte strings to pointers, with
** linear probing. Used for the children of a trie node, for the interned
** subjects and for dedup keys.
**
** Invariants: cap is 0 or a power of two; count stays at most 3/4 of cap,
** so a probe always ends at an empty slot; every entry lies between its
** home slot (hash & (cap - 1)) and the next empty slot. Deleting shifts
** the entries after it back (no tombstones), so a map that deletes as
** much as it inserts, like the bounded subject cache, never needs a
** rehash and its probes stay short.
** It does not own keys or values, and it never shrinks. Deleting during
** an iteration may move an entry the iteration has not reached behind it.
*/
#include <stdlib.h>
#include <string.h>

#include "buzz.h"

void buzz__map_init(buzz_map *m) {
  m->slots = NULL;
  m->cap = m->count = m->used = 0;
}

void buzz__map_free(buzz_map *m) {
  free(m->slots);
  buzz__map_init(m);
}

/* FNV-1a, 32 bits: short keys, good enough spread, no state. */
uint32_t buzz__map_hash(const char *key, size_t len) {
  uint32_t h = 2166136261u;
  size_t i;
  for (i = 0; i < len; i++) {
    h ^= (unsigned char)key[i];
    h *= 16777619u;
  }
  return h;
}

static buzz_map_slot *map_find(const buzz_map *m, const char *key,
                               size_t len, uint32_t hash) {
  size_t mask, i;
  if (m->cap == 0) return NULL;
  mask = m->cap - 1;
  for (i = hash & mask; ; i = (i + 1) & mask) {
    buzz_map_slot *s = &m->slots[i];
    if (s->key == NULL) return NULL;
    if (s->hash == hash && s->len == len && memcmp(s->key, key, len) == 0)
      return s;
  }
}

void *buzz__map_get(const buzz_map *m, const char *key, size_t len,
                    uint32_t hash) {
  buzz_map_slot *s = map_find(m, key, len, hash);
  return s ? s->value : NULL;
}

static int map_grow(buzz_map *m) {
  size_t ncap = m->cap ? m->cap * 2 : 8, i, mask = ncap - 1;
  buzz_map_slot *ns = calloc(ncap, sizeof *ns);
  if (ns == NULL) return BUZZ_ENOMEM;
  for (i = 0; i < m->cap; i++) {
    buzz_map_slot *s = &m->slots[i];
    size_t j;
    if (s->key == NULL) continue;
    for (j = s->hash & mask; ns[j].key != NULL; j = (j + 1) & mask) {}
    ns[j] = *s;
  }
  free(m->slots);
  m->slots = ns;
  m->cap = ncap;
  m->used = m->count;
  return BUZZ_OK;
}

int buzz__map_put(buzz_map *m, const char *key, size_t len, uint32_t hash,
                  void *value) {
  size_t mask, i;
  buzz_map_slot *s = map_find(m, key, len, hash);
  if (s != NULL) {
    s->value = value;
    return BUZZ_OK;
  }
  if ((m->count + 1) * 4 > m->cap * 3) {
    int rc = map_grow(m);
    if (rc < 0) return rc;
  }
  mask = m->cap - 1;
  for (i = hash & mask; m->slots[i].key != NULL; i = (i + 1) & mask) {}
  s = &m->slots[i];
  m->used++;
  s->key = key;
  s->len = len;
  s->hash = hash;
  s->value = value;
  m->count++;
  return BUZZ_OK;
}

void *buzz__map_del(buzz_map *m, const char *key, size_t len, uint32_t hash) {
  buzz_map_slot *s = map_find(m, key, len, hash);
  size_t mask, i, j;
  void *v;
  if (s == NULL) return NULL;
  v = s->value;
  mask = m->cap - 1;
  i = (size_t)(s - m->slots);
  /* Backward shift: each later entry of the run whose home is not between
  ** the hole and itself moves into the hole, and the hole moves on to it. */
  for (j = (i + 1) & mask; m->slots[j].key != NULL; j = (j + 1) & mask) {
    size_t home = m->slots[j].hash & mask;
    if (((j - home) & mask) >= ((j - i) & mask)) {
      m->slots[i] = m->slots[j];
      i = j;
    }
  }
  m->slots[i].key = NULL;
  m->slots[i].value = NULL;
  m->count--;
  m->used--;
  return v;
}

buzz_map_slot *buzz__map_next(const buzz_map *m, size_t *i) {
  while (*i < m->cap) {
    buzz_map_slot *s = &m->slots[(*i)++];
    if (s->key != NULL) return s;
  }
  return NULL;
}
