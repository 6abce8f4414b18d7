/*
** map.c: an open-addressing hash map from byte strings to pointers, with
** linear probing and tombstones. Used for the children of a trie node and
** for the interned subjects.
**
** Invariants: cap is 0 or a power of two; used (live + tombstones) stays
** below 3/4 of cap, so a probe always ends at an empty slot.
** It does not own keys or values, and it never shrinks (a rehash on growth
** drops the tombstones).
*/
#include <stdlib.h>
#include <string.h>

#include "buzz.h"

static const char map_tomb[1];
#define MAP_TOMB map_tomb

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
    if (s->key != MAP_TOMB && s->hash == hash && s->len == len &&
        memcmp(s->key, key, len) == 0)
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
  buzz_map_slot *ns;
  if (m->count * 2 < m->cap) ncap = m->cap;   /* mostly tombstones: rehash */
  mask = ncap - 1;
  ns = calloc(ncap, sizeof *ns);
  if (ns == NULL) return BUZZ_ENOMEM;
  for (i = 0; i < m->cap; i++) {
    buzz_map_slot *s = &m->slots[i];
    size_t j;
    if (s->key == NULL || s->key == MAP_TOMB) continue;
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
  if ((m->used + 1) * 4 > m->cap * 3) {
    int rc = map_grow(m);
    if (rc < 0) return rc;
  }
  mask = m->cap - 1;
  for (i = hash & mask; ; i = (i + 1) & mask) {
    s = &m->slots[i];
    if (s->key == NULL || s->key == MAP_TOMB) break;
  }
  if (s->key == NULL) m->used++;
  s->key = key;
  s->len = len;
  s->hash = hash;
  s->value = value;
  m->count++;
  return BUZZ_OK;
}

void *buzz__map_del(buzz_map *m, const char *key, size_t len, uint32_t hash) {
  buzz_map_slot *s = map_find(m, key, len, hash);
  void *v;
  if (s == NULL) return NULL;
  v = s->value;
  s->key = MAP_TOMB;
  s->value = NULL;
  m->count--;
  return v;
}

buzz_map_slot *buzz__map_next(const buzz_map *m, size_t *i) {
  while (*i < m->cap) {
    buzz_map_slot *s = &m->slots[(*i)++];
    if (s->key != NULL && s->key != MAP_TOMB) return s;
  }
  return NULL;
}
