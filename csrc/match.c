/*
** match.c: the subject grammar, the subscription trie and the per-type
** match cache.
**
** Grammar (NATS): tokens separated by '.', no empty tokens, no white space
** or control characters, at most BUZZ_SUBJECT_MAX bytes. In a pattern, a
** token that is exactly "*" matches one token and a last token that is
** exactly ">" matches one or more tokens. A wildcard inside a longer token
** is an ordinary character. A first wildcard token never matches a type
** whose first token starts with '$' (reserved subjects).
**
** The trie has one node per pattern prefix; literal children are in a hash
** map, the "*" and ">" children in their own slots. A subscription hangs on
** the node where its pattern ends. Matching walks only the branches that
** can match, so its cost depends on the type's depth and the wildcards on
** its path, not on the number of subscriptions.
**
** Matching results are cached per published type (a buzz_subject) as an
** immutable, reference-counted vector sorted by subscription order. Any
** insert or remove bumps the trie's generation; a stale vector is rebuilt
** on the next lookup of its type. The cache holds at most
** SUBJECT_CACHE_MAX types and, once full, evicts one type per new one by
** CLOCK: a hit sets the type's referenced byte; a miss jumps the hand to a
** pseudo-random slot, which then clears referenced bytes until it meets an
** unreferenced type, and evicts it. The jump matters: a plain hand is FIFO
** for types published in a fixed rotation, so one type more than the cache
** holds would miss every time; jumping, the hit rate falls gradually with
** the number of types (about 60% of a rotation 1.2 times the cache is
** hit, 20% of one twice it). Evicted subjects still used by queued events
** live on through their reference counts.
**
** It does not decide who receives an event that was published before a
** subscription existed (bus.c filters by sequence number), and it never
** frees a subscription (bus.c owns them).
*/
#include <stdlib.h>
#include <string.h>

#include "buzz.h"

#define SUBJECT_CACHE_MAX 4096   /* a power of two: the hand masks */
typedef char subject_cache_max_is_a_power_of_two
  [(SUBJECT_CACHE_MAX & (SUBJECT_CACHE_MAX - 1)) == 0 ? 1 : -1];

typedef struct trie_node {
  struct trie_node *parent;  /* borrows; NULL for the root */
  char *token;               /* owns; key in parent's children, or NULL */
  size_t len;
  uint32_t hash;
  buzz_map children;         /* literal tokens -> trie_node, owns them */
  struct trie_node *star;    /* owns; the "*" child */
  struct trie_node *gt;      /* owns; the ">" child (a leaf) */
  buzz_sub **subs;           /* owns the array; subs are borrowed */
  size_t nsubs, capsubs;
} trie_node;

struct buzz_trie {
  trie_node root;
  uint64_t gen;              /* bumped by every insert and remove */
  buzz_map subjects;         /* type -> buzz_subject, the cached ones */
  buzz_subject **ring;       /* owns the array: the cached subjects, each at
                                its ring_slot, for the CLOCK hand */
  size_t nring, capring;     /* nring == subjects.count */
  uint32_t rng;              /* xorshift32 state of the hand's jumps */
  int64_t misses;            /* subjects made (lookups that missed) */
};

typedef struct vec_builder {
  buzz_sub **v;              /* owns */
  size_t n, cap;
  int failed;
} vec_builder;


/* ------------------------------------------------------------ grammar */

static const char *token_check(const char *t, size_t len, int is_pattern,
                               int is_last) {
  if (len != 1 || (t[0] != '*' && t[0] != '>')) return NULL;
  if (!is_pattern)
    return "contains a wildcard token (\"*\" or \">\"): a published type "
           "names one concrete subject, such as \"task.start\"";
  if (t[0] == '>' && !is_last)
    return "has \">\" before its last token: \">\" matches all the "
           "remaining tokens, so it may only come last (\"repo.>\")";
  return NULL;
}

const char *buzz__subject_check(const char *s, size_t len, int is_pattern) {
  size_t i, start = 0;
  const char *err;
  if (len == 0)
    return "is empty: a subject is one or more tokens separated by dots, "
           "such as \"task.start\"";
  if (len > BUZZ_SUBJECT_MAX)
    return "is longer than 1024 bytes";
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '.') {
      if (i == start)
        return "has an empty token: separate tokens with single dots, "
               "with none at either end (\"a.b\", not \"a..b\" or \"a.\")";
      err = token_check(s + start, i - start, is_pattern, 0);
      if (err) return err;
      start = i + 1;
    } else if (c <= 0x20 || c == 0x7f) {
      return "contains white space or a control character: tokens are "
             "printable characters without spaces (\"order.created\")";
    }
  }
  if (start == len)
    return "has an empty token: separate tokens with single dots, "
           "with none at either end (\"a.b\", not \"a..b\" or \"a.\")";
  return token_check(s + start, len - start, is_pattern, 1);
}


/* --------------------------------------------------------------- trie */

static void node_init(trie_node *n, trie_node *parent) {
  memset(n, 0, sizeof *n);
  n->parent = parent;
  buzz__map_init(&n->children);
}

static void node_free(trie_node *n, int is_root) {
  size_t i = 0;
  buzz_map_slot *s;
  while ((s = buzz__map_next(&n->children, &i)) != NULL)
    node_free((trie_node *)s->value, 0);
  buzz__map_free(&n->children);
  if (n->star) node_free(n->star, 0);
  if (n->gt) node_free(n->gt, 0);
  free(n->subs);
  free(n->token);
  if (!is_root) free(n);
}

static int node_is_empty(const trie_node *n) {
  return n->nsubs == 0 && n->children.count == 0 && !n->star && !n->gt;
}

/* Finds or makes the child for one pattern token; NULL when out of memory. */
static trie_node *node_child(trie_node *n, const char *tok, size_t len) {
  trie_node *c;
  uint32_t h;
  if (len == 1 && (tok[0] == '*' || tok[0] == '>')) {
    trie_node **slot = tok[0] == '*' ? &n->star : &n->gt;
    if (*slot == NULL) {
      if ((c = malloc(sizeof *c)) == NULL) return NULL;
      node_init(c, n);
      *slot = c;
    }
    return *slot;
  }
  h = buzz__map_hash(tok, len);
  c = buzz__map_get(&n->children, tok, len, h);
  if (c != NULL) return c;
  if ((c = malloc(sizeof *c)) == NULL) return NULL;
  node_init(c, n);
  if ((c->token = malloc(len + 1)) == NULL) {
    free(c);
    return NULL;
  }
  memcpy(c->token, tok, len);
  c->token[len] = '\0';
  c->len = len;
  c->hash = h;
  if (buzz__map_put(&n->children, c->token, len, h, c) < 0) {
    free(c->token);
    free(c);
    return NULL;
  }
  return c;
}

/* Detaches and frees empty nodes from n up towards the root. */
static void node_prune(trie_node *n) {
  while (n->parent != NULL && node_is_empty(n)) {
    trie_node *p = n->parent;
    if (p->star == n) p->star = NULL;
    else if (p->gt == n) p->gt = NULL;
    else buzz__map_del(&p->children, n->token, n->len, n->hash);
    node_free(n, 0);
    n = p;
  }
}

buzz_trie *buzz__trie_new(void) {
  buzz_trie *t = malloc(sizeof *t);
  if (t == NULL) return NULL;
  node_init(&t->root, NULL);
  t->gen = 1;
  buzz__map_init(&t->subjects);
  t->ring = NULL;
  t->nring = t->capring = 0;
  t->rng = 2463534242u;      /* any non-zero seed: runs are repeatable */
  t->misses = 0;
  return t;
}

static void subject_free(buzz_subject *s) {
  if (s->vec) buzz__matchvec_release(s->vec);
  free(s);                   /* the type is in the same block */
}

/* Removes every subject from the cache; those still referenced live on. */
static void subjects_clear(buzz_trie *t) {
  size_t i;
  for (i = 0; i < t->nring; i++) {
    buzz_subject *s = t->ring[i];
    s->is_cached = 0;
    if (s->refcount == 0) subject_free(s);
  }
  free(t->ring);
  t->ring = NULL;
  t->nring = t->capring = 0;
  buzz__map_free(&t->subjects);
}

void buzz__trie_free(buzz_trie *t) {
  if (t == NULL) return;
  subjects_clear(t);
  node_free(&t->root, 1);
  free(t);
}

int buzz__trie_insert(buzz_trie *t, buzz_sub *sub) {
  trie_node *n = &t->root, *last;
  const char *p = sub->pattern, *end = p + sub->len;
  while (p <= end) {
    const char *dot = memchr(p, '.', (size_t)(end - p));
    size_t len = dot ? (size_t)(dot - p) : (size_t)(end - p);
    last = n;
    n = node_child(n, p, len);
    if (n == NULL) {
      node_prune(last);
      return BUZZ_ENOMEM;
    }
    p += len + 1;
  }
  if (n->nsubs == n->capsubs) {
    size_t ncap = n->capsubs ? n->capsubs * 2 : 2;
    buzz_sub **ns = realloc(n->subs, ncap * sizeof *ns);
    if (ns == NULL) {
      node_prune(n);
      return BUZZ_ENOMEM;
    }
    n->subs = ns;
    n->capsubs = ncap;
  }
  n->subs[n->nsubs++] = sub;
  sub->trie_node = n;
  t->gen++;
  return BUZZ_OK;
}

void buzz__trie_remove(buzz_trie *t, buzz_sub *sub) {
  trie_node *n = sub->trie_node;
  size_t i;
  if (n == NULL) return;
  for (i = 0; i < n->nsubs; i++) {
    if (n->subs[i] == sub) {
      n->subs[i] = n->subs[--n->nsubs];   /* order is restored by seq */
      break;
    }
  }
  sub->trie_node = NULL;
  node_prune(n);
  t->gen++;
}


/* ------------------------------------------------------------ matching */

static void vb_add(vec_builder *b, trie_node *n) {
  if (n->nsubs == 0 || b->failed) return;
  if (b->n + n->nsubs > b->cap) {
    size_t ncap = b->cap ? b->cap : 8;
    buzz_sub **nv;
    while (ncap < b->n + n->nsubs) ncap *= 2;
    nv = realloc(b->v, ncap * sizeof *nv);
    if (nv == NULL) {
      b->failed = 1;
      return;
    }
    b->v = nv;
    b->cap = ncap;
  }
  memcpy(b->v + b->n, n->subs, n->nsubs * sizeof *n->subs);
  b->n += n->nsubs;
}

/*
** Collects the subs of node n that match the tokens of s from offset pos
** (pos > len means every token has been consumed).
*/
static void collect(trie_node *n, const char *s, size_t len, size_t pos,
                    int is_reserved_root, vec_builder *b) {
  const char *dot;
  size_t tlen;
  trie_node *c;
  if (pos > len) {
    vb_add(b, n);
    return;
  }
  dot = memchr(s + pos, '.', len - pos);
  tlen = dot ? (size_t)(dot - (s + pos)) : len - pos;
  if (!is_reserved_root) {
    if (n->gt) vb_add(b, n->gt);
    if (n->star) collect(n->star, s, len, pos + tlen + 1, 0, b);
  }
  if (n->children.count) {
    c = buzz__map_get(&n->children, s + pos, tlen,
                      buzz__map_hash(s + pos, tlen));
    if (c) collect(c, s, len, pos + tlen + 1, 0, b);
  }
}

static int by_seq(const void *a, const void *b) {
  uint64_t x = (*(buzz_sub * const *)a)->seq;
  uint64_t y = (*(buzz_sub * const *)b)->seq;
  return x < y ? -1 : x > y;
}

static int match_build(buzz_trie *t, const buzz_subject *s,
                       buzz_matchvec **out) {
  vec_builder b = { NULL, 0, 0, 0 };
  buzz_matchvec *v;
  size_t i;
  collect(&t->root, s->type, s->len, 0, s->is_reserved, &b);
  if (b.failed) {
    free(b.v);
    return BUZZ_ENOMEM;
  }
  if (b.n > 1) qsort(b.v, b.n, sizeof *b.v, by_seq);
  v = malloc(sizeof *v + (b.n ? b.n - 1 : 0) * sizeof v->subs[0]);
  if (v == NULL) {
    free(b.v);
    return BUZZ_ENOMEM;
  }
  v->refcount = 1;
  v->n = b.n;
  for (i = 0; i < b.n; i++) {
    v->subs[i] = b.v[i];
    b.v[i]->refcount++;
  }
  free(b.v);
  *out = v;
  return BUZZ_OK;
}

void buzz__matchvec_release(buzz_matchvec *v) {
  size_t i;
  if (v == NULL || --v->refcount > 0) return;
  for (i = 0; i < v->n; i++) {
    buzz_sub *sub = v->subs[i];
    if (--sub->refcount == 0) buzz__sub_free(sub);
  }
  free(v);
}

int buzz__trie_match(buzz_trie *t, buzz_subject *s, buzz_matchvec **out) {
  if (s->vec == NULL || s->gen != t->gen) {
    buzz_matchvec *v;
    int rc = match_build(t, s, &v);
    if (rc < 0) return rc;
    buzz__matchvec_release(s->vec);
    s->vec = v;
    s->gen = t->gen;
  }
  *out = s->vec;
  return BUZZ_OK;
}


/* ------------------------------------------------------------ subjects */

/*
** Makes room for one more subject in a full cache: the CLOCK hand jumps to
** a pseudo-random slot (xorshift32), clears the referenced byte of each
** type it passes and evicts the first unreferenced one, whose slot it
** returns. Every byte it clears was set by a hit since the hand last
** passed, so the sweep costs O(1) amortized per miss.
*/
static size_t cache_evict(buzz_trie *t) {
  size_t mask = SUBJECT_CACHE_MAX - 1, h;
  uint32_t x = t->rng;
  buzz_subject *s;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  t->rng = x;
  for (h = x & mask; t->ring[h]->is_referenced; h = (h + 1) & mask)
    t->ring[h]->is_referenced = 0;
  s = t->ring[h];
  buzz__map_del(&t->subjects, s->type, s->len, s->hash);
  s->is_cached = 0;
  if (s->refcount == 0) subject_free(s);
  t->nring--;
  return h;
}

buzz_subject *buzz__trie_subject(buzz_trie *t, const char *type,
                                 size_t len) {
  uint32_t h = buzz__map_hash(type, len);
  buzz_subject *s = buzz__map_get(&t->subjects, type, len, h);
  size_t slot;
  if (s != NULL) {
    s->refcount++;
    s->is_referenced = 1;
    return s;
  }
  if (t->nring == t->capring && t->capring < SUBJECT_CACHE_MAX) {
    size_t ncap = t->capring ? t->capring * 2 : 64;
    buzz_subject **nr = realloc(t->ring, ncap * sizeof *nr);
    if (nr == NULL) return NULL;
    t->ring = nr;
    t->capring = ncap;
  }
  /* One block: the record, then its type (len <= BUZZ_SUBJECT_MAX). */
  if ((s = malloc(sizeof *s + len + 1)) == NULL) return NULL;
  memset(s, 0, sizeof *s);
  s->type = (char *)(s + 1);
  memcpy(s->type, type, len);
  s->type[len] = '\0';
  s->len = len;
  s->hash = h;
  s->is_reserved = type[0] == '$';
  s->refcount = 1;
  /* Evict only now that nothing can fail but the put: a failed put then
  ** leaves a free slot behind, never a hole in a full ring. */
  slot = t->nring == SUBJECT_CACHE_MAX ? cache_evict(t) : t->nring;
  if (buzz__map_put(&t->subjects, s->type, len, h, s) < 0) {
    if (slot != t->nring) {            /* keep the ring dense */
      t->ring[slot] = t->ring[t->nring];
      t->ring[slot]->ring_slot = slot;
    }
    free(s);
    return NULL;
  }
  t->ring[slot] = s;
  s->ring_slot = slot;
  t->nring++;
  t->misses++;
  s->is_cached = 1;
  return s;
}

void buzz__subject_release(buzz_subject *s) {
  if (--s->refcount == 0 && !s->is_cached) subject_free(s);
}

size_t buzz__trie_cached(const buzz_trie *t) {
  return t->subjects.count;
}

int64_t buzz__trie_misses(const buzz_trie *t) {
  return t->misses;
}

/*
** One pattern against one type, without a trie: for store queries (a SQL
** function) and other one-off checks. Both must be valid; the reserved
** rule holds (a wildcard first token never matches a '$' type).
*/
int buzz__subject_match(const char *pat, size_t plen, const char *type,
                        size_t tlen) {
  size_t pi = 0, ti = 0;
  int is_first = 1;
  for (;;) {
    size_t pe = pi, te = ti;
    while (pe < plen && pat[pe] != '.') pe++;
    if (pe - pi == 1 && pat[pi] == '>')
      return ti < tlen && !(is_first && type[0] == '$');
    if (ti >= tlen) return 0;
    while (te < tlen && type[te] != '.') te++;
    if (pe - pi == 1 && pat[pi] == '*') {
      if (is_first && type[0] == '$') return 0;
    } else if (pe - pi != te - ti || memcmp(pat + pi, type + ti, pe - pi)) {
      return 0;
    }
    is_first = 0;
    if (pe >= plen) return te >= tlen;
    if (te >= tlen) return 0;
    pi = pe + 1;
    ti = te + 1;
  }
}
