/*
** buzz.h: internal interface of the buzz C core.
**
** Every C file of the core includes this header (the store's files
** include store.h, which includes this one); only the binding files
** (l*.c, json*.c) include a Lua header. The pieces talk through plain C types: Lua values
** that must travel with an event or a subscription are held by lbuzz.c as
** integer references ("refs") that the core stores without interpreting.
**
** Functions return 0 or a negative BUZZ_E* code. When a call fails, it has
** changed nothing and calls no callback (libuv's rule).
**
** Names: shared functions are buzz__<concern>_<verb>; everything else in a
** file is static. The only exported symbol is luaopen_buzz_core.
*/
#ifndef BUZZ_H
#define BUZZ_H

#include <stddef.h>
#include <stdint.h>

/* Internal functions stay internal even in builds (LuaRocks) that do not
** pass -fvisibility=hidden: only luaopen_buzz_core is exported. */
#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

/*
** The error map. One list generates the enum, the names ("EFULL") and the
** messages, and core.errors for Lua: every code that reaches on_error or
** a `nil, "CODE: message", "CODE"` return, the Lua layer's included, is
** here. Numbers are stable: later issues append, never renumber.
*/
#define BUZZ_ERRNO_MAP(X)                                          \
  X(NOMEM,   1, "out of memory")                                   \
  X(SUBJECT, 2, "malformed subject")                               \
  X(FULL,    3, "queue is full")                                   \
  X(CLOSED,  4, "attempt to use a closed bus")                     \
  X(LOOP,    5, "event loop failure")                              \
  X(INVAL,   6, "invalid argument")                              \
  X(STORE,   7, "store failure")                                 \
  X(LOCKED,  8, "store is locked by another writer")             \
  X(TOOBIG,  9, "payload is too big")                            \
  X(DEPTH,  10, "nested synchronous delivery is too deep")       \
  X(DECODE, 11, "a stored event does not decode")                \
  X(INHANDLER, 12, "called from inside a handler")               \
  X(TIMEOUT, 13, "a handler did not finish in time")             \
  X(YIELD,  14, "a handler yielded what buzz cannot resume")     \
  X(CALLBACK, 15, "a function given to buzz raised")             \
  X(FROZEN, 16, "a handler changed an event it was given")       \
  X(CONFLICT, 17, "a stream is not at the version expected")     \
  X(UNAVAILABLE, 18, "a remote service is not reachable")

typedef enum {
  BUZZ_OK = 0,
#define BUZZ__GEN_ENUM(name, num, msg) BUZZ_E##name = -(num),
  BUZZ_ERRNO_MAP(BUZZ__GEN_ENUM)
#undef BUZZ__GEN_ENUM
  BUZZ__EMIN
} buzz_errno;

/*
** BUZZ_METRIC(stmt): a metrics counter's update, compiled out with
** -DBUZZ_NO_METRICS (bench/metrics_cost.sh builds that core to measure
** what the always-on metrics cost; core.metrics_built says which).
*/
#ifdef BUZZ_NO_METRICS
#define BUZZ_METRIC(stmt) ((void)sizeof(stmt))   /* not evaluated */
#else
#define BUZZ_METRIC(stmt) (stmt)
#endif

/* "No Lua value": equals LUA_NOREF (lbuzz.c checks at compile time). */
#define BUZZ_NOREF (-2)

const char *buzz__err_name(int code);     /* "EFULL"; "EUNKNOWN" if none */
const char *buzz__err_message(int code);  /* "queue is full" */
/* The i-th code of the map, i from 0; 0 past the last. */
int buzz__err_code(size_t i);

/* Formats a message into err (errlen bytes, always terminated); does
** nothing when err is NULL or errlen 0. For the engine files' err out
** parameters. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
void buzz__set_err(char *err, size_t errlen, const char *fmt, ...);


/* ---------------------------------------------------------------- map.c */

/*
** An open-addressing hash map from byte strings to pointers. The map does
** not own keys or values: a key must stay valid while its entry exists
** (callers point it into the value they store).
** CONSTRUCTOR: buzz__map_init()   DESTRUCTOR: buzz__map_free()
*/
typedef struct buzz_map_slot {
  const char *key;   /* borrows; NULL = empty */
  size_t len;
  uint32_t hash;
  void *value;       /* borrows */
} buzz_map_slot;

typedef struct buzz_map {
  buzz_map_slot *slots;  /* owns; NULL while empty */
  size_t cap;            /* power of two, or 0 */
  size_t count;          /* live entries */
  size_t used;           /* equals count (deletes leave no tombstones) */
} buzz_map;

void buzz__map_init(buzz_map *m);
void buzz__map_free(buzz_map *m);
uint32_t buzz__map_hash(const char *key, size_t len);
void *buzz__map_get(const buzz_map *m, const char *key, size_t len,
                    uint32_t hash);
int buzz__map_put(buzz_map *m, const char *key, size_t len, uint32_t hash,
                  void *value);
void *buzz__map_del(buzz_map *m, const char *key, size_t len, uint32_t hash);
/* Iteration: i starts at 0; returns the next live slot or NULL. */
buzz_map_slot *buzz__map_next(const buzz_map *m, size_t *i);


/* -------------------------------------------------------------- match.c */

#define BUZZ_SUBJECT_MAX 1024   /* bytes in a subject or pattern */

/*
** A subscription as the dispatcher sees it.
** CONSTRUCTOR: buzz__bus_subscribe()   DESTRUCTOR: sub_release() in bus.c,
** when the last reference goes (never during a delivery that holds one).
*/
typedef struct buzz_sub {
  uint64_t seq;          /* subscription order; unique within a bus */
  size_t slot;           /* index in bus->slots while live; the sub's id */
  char *pattern;         /* owns; NUL-terminated */
  size_t len;
  unsigned refcount;     /* bus slot + each match vector that lists it */
  unsigned is_dead : 1;  /* set by unsubscribe; never delivered again */
  unsigned is_once : 1;  /* unsubscribed when its first delivery is handed */
  int data_ref;          /* borrows; Lua refs owned by lbuzz.c: the */
  int fn_ref;            /* subscription object and its handler */
  char *durable;         /* owns; durable consumer name, or NULL: such a
                            sub reads the store, not the live queue */
  int64_t acked;         /* durable: last id handled (its position) */
  int64_t saved;         /* durable: the position last given the writer */
  int64_t page_last;     /* durable: the last id of the page handed out */
  int64_t page_to;       /* durable: its position once that one is acked */
  int filter_ref;        /* borrows; a Lua ref owned by lbuzz.c to the
                            sub's prefilter, or BUZZ_NOREF: see accept */
  void *trie_node;       /* private to match.c: where the sub is indexed */
} buzz_sub;

/*
** The subscriptions that match one type, in subscription order. Immutable
** once built; shared by the cache and by every cursor delivering an event of
** that type. Holds a reference on each sub it lists.
*/
typedef struct buzz_matchvec {
  unsigned refcount;
  size_t n;
  buzz_sub *subs[1];     /* n entries (at least one slot allocated) */
} buzz_matchvec;

/*
** An interned published type and its cached audience. Events hold a
** reference so the type string is stored once however many are queued.
*/
typedef struct buzz_subject {
  char *type;            /* NUL-terminated; in the record's own block */
  size_t len;
  uint32_t hash;
  unsigned refcount;     /* events that point here */
  unsigned is_cached : 1;/* still in the trie's subject cache */
  unsigned is_reserved : 1; /* first token starts with '$' */
  unsigned char is_referenced; /* CLOCK: looked up since the hand passed
                                  (a byte, so a hit sets it in one store) */
  size_t ring_slot;      /* private to match.c: its place in the cache */
  uint64_t gen;          /* trie generation vec was built at */
  buzz_matchvec *vec;    /* owns a reference; NULL until first lookup */
} buzz_subject;

typedef struct buzz_trie buzz_trie;

/*
** Checks a subject. is_pattern allows the wildcards "*" and ">" (">" only
** as the last token). Returns NULL if valid, else a static sentence that
** says what is wrong and how to fix it.
*/
const char *buzz__subject_check(const char *s, size_t len, int is_pattern);

buzz_trie *buzz__trie_new(void);
void buzz__trie_free(buzz_trie *t);
int buzz__trie_insert(buzz_trie *t, buzz_sub *sub);
void buzz__trie_remove(buzz_trie *t, buzz_sub *sub);
/* Interns a type (assumed valid); the caller takes a reference. */
buzz_subject *buzz__trie_subject(buzz_trie *t, const char *type,
                                 size_t len);
void buzz__subject_release(buzz_subject *s);
/* The audience of a subject, rebuilt if subscriptions changed; borrowed. */
int buzz__trie_match(buzz_trie *t, buzz_subject *s, buzz_matchvec **out);
void buzz__matchvec_release(buzz_matchvec *v);
size_t buzz__trie_cached(const buzz_trie *t);  /* for tests and stats */
int64_t buzz__trie_misses(const buzz_trie *t);  /* lookups that missed */
/* Called by bus.c when a sub's last reference goes. */
void buzz__sub_free(buzz_sub *sub);


/* -------------------------------------------------------------- queue.c */

enum {
  BUZZ_PRIO_CRITICAL = 0, BUZZ_PRIO_HIGH, BUZZ_PRIO_NORMAL, BUZZ_PRIO_LOW,
  BUZZ_NPRIO
};

/*
** A pending event. Lua values travel as refs owned by lbuzz.c; the core
** stores them and hands them back through bus->on_event_free.
** CONSTRUCTOR: buzz__event_new()   DESTRUCTOR: buzz__event_free()
** (both through the queue's spare list, so the hot path rarely mallocs)
*/
typedef struct buzz_event {
  struct buzz_event *next;  /* link; owned by the queue while queued */
  int64_t id;
  int64_t ts;               /* milliseconds since the epoch */
  int64_t causation_id;     /* 0 = none */
  buzz_subject *subject;    /* owns a reference */
  uint64_t audience;        /* subs with seq <= audience may receive it */
  int payload_ref;          /* Lua refs, owned by lbuzz.c */
  int key_ref;
  int corr_ref;
  int headers_ref;
  int table_ref;            /* the event table, once built */
  int version;              /* schema version given at publish, or 0 */
  int stream_ref;           /* Lua ref of its stream's name, or NOREF */
  int64_t stream_version;   /* its version in that stream; 0: none */
  unsigned char priority;
} buzz_event;

typedef struct buzz_queue {
  buzz_event *head[BUZZ_NPRIO];   /* owns the events */
  buzz_event *tail[BUZZ_NPRIO];
  size_t count;
  size_t nprio[BUZZ_NPRIO];       /* count, by priority */
  size_t limit;                   /* 0 = unlimited */
  buzz_event *spare;              /* owns; freed records kept for reuse */
  size_t nspare;
} buzz_queue;

/* Records come from and go back to q's spare list (bounded). */
buzz_event *buzz__event_new(buzz_queue *q);
void buzz__event_free(buzz_queue *q, buzz_event *ev);
void buzz__queue_free(buzz_queue *q);    /* frees the spare records */
void buzz__queue_init(buzz_queue *q, size_t limit);
int buzz__queue_push(buzz_queue *q, buzz_event *ev);   /* BUZZ_EFULL */
buzz_event *buzz__queue_pop(buzz_queue *q);
int64_t buzz__clock_ms(void);


/* ---------------------------------------------------------------- bus.c */

/*
** A delivery cursor: the event being delivered and how far through its
** audience the dispatcher has got. Level 0 reads the queue; each nested
** publish_sync pushes one more level.
*/
typedef struct buzz_cursor {
  buzz_event *ev;         /* owns while set */
  buzz_matchvec *vec;     /* owns a reference while set */
  size_t i;               /* next index into vec */
} buzz_cursor;

typedef void (*buzz_event_free_cb)(void *ctx, buzz_event *ev);

/*
** The dispatcher: subscriptions, the queue and the cursors.
** CONSTRUCTOR: buzz__bus_init()   DESTRUCTOR: buzz__bus_close()
*/
typedef struct buzz_bus {
  /* public */
  buzz_event_free_cb on_event_free;  /* releases an event's refs */
  /* optional: for a sub with a filter_ref, may it have ev? 0 skips the
  ** delivery (a once sub stays subscribed). Called with the ctx given to
  ** buzz__bus_next(). */
  int (*accept)(void *ctx, const buzz_sub *sub, const buzz_event *ev);
  /* read-only */
  buzz_queue queue;
  int64_t last_id;
  uint64_t last_seq;
  size_t nsubs;           /* live subscriptions */
  unsigned is_closed : 1;
  /* public: set by the caller before buzz__bus_next() */
  int64_t gate;           /* with has_gate, queued events above this id */
  unsigned has_gate : 1;  /* are not handed out (not committed yet) */
  unsigned is_gated : 1;  /* set when buzz__bus_next() stopped at the gate */
  unsigned has_below : 1; /* with it, level 0 pops no event of priority */
  int below;              /* below or less urgent from the queue */
  /* private */
  buzz_trie *trie;        /* owns */
  buzz_sub **slots;       /* owns a reference on each live sub */
  size_t nslots;
  size_t *free_slots;     /* owns; a stack of reusable slot indices */
  size_t nfree;
  buzz_cursor *cursors;   /* owns; cursors[0] is the queue's */
  size_t depth;           /* levels in use, >= 1 */
  size_t cap;
} buzz_bus;

int buzz__bus_init(buzz_bus *b, size_t queue_limit);
/* Discards pending events (through on_event_free) and frees everything;
** returns how many pending events were discarded. Idempotent. */
size_t buzz__bus_close(buzz_bus *b, void *ctx);
int buzz__bus_subscribe(buzz_bus *b, const char *pattern, size_t len,
                        int is_once, int data_ref, buzz_sub **out);
/* Returns 1 if the sub was live, 0 if it was already unsubscribed. */
int buzz__bus_unsubscribe(buzz_bus *b, buzz_sub *sub);
/*
** Publishes ev (filled by the caller; id and ts assigned here unless the
** caller preset them, as a store does: a preset id must exceed last_id). With
** is_sync, the event gets a cursor of its own at level *level instead of
** a place in the queue. On failure ev is untouched and still the caller's.
** An event with no audience is not queued: it is freed at once (its id is
** still consumed). Returns 1 if the bus kept ev (the caller then fills
** its refs), 0 if it freed it for want of an audience.
*/
int buzz__bus_publish(buzz_bus *b, buzz_event *ev, const char *type,
                      size_t len, int is_sync, size_t *level);
/*
** The next delivery at a level: sets *sub and *ev and returns 1, or returns
** 0 when that level has nothing more (a sync level is then popped).
** lbuzz.c builds the event table on the first delivery (table_ref unset).
*/
int buzz__bus_next(buzz_bus *b, size_t level, buzz_sub **sub,
                   buzz_event **ev, void *ctx);
size_t buzz__bus_pending(const buzz_bus *b);
/* The live sub with this id (slot + 1), or NULL. */
buzz_sub *buzz__bus_sub(const buzz_bus *b, int64_t id);
/* Keeps a sub's memory alive across a call that may unsubscribe it. */
void buzz__sub_hold(buzz_sub *sub);
void buzz__sub_release(buzz_sub *sub);
/* Removes queued events with lo <= id <= hi; returns how many. */
size_t buzz__bus_drop_range(buzz_bus *b, int64_t lo, int64_t hi, void *ctx);


/* --------------------------------------------------------------- loop.c */

/*
** The core's own libuv loop and the pollable descriptor of the loop
** contract. The descriptor is the loop's backend fd (uv_backend_fd); it is
** made readable while work is pending once a host has asked for it.
** CONSTRUCTOR: buzz__loop_new()   DESTRUCTOR: buzz__loop_close()
*/
typedef struct buzz_loop buzz_loop;

int buzz__loop_new(buzz_loop **out);
void buzz__loop_close(buzz_loop *l);     /* closes handles, frees */
int buzz__loop_fd(buzz_loop *l);         /* enables signalling */
void buzz__loop_signal(buzz_loop *l, int has_work);
uint64_t buzz__hrtime(void);            /* ns, monotonic (uv_hrtime) */
/* Consumes any wake-up, ours or another thread's (a polled loop only). */
void buzz__loop_consume(buzz_loop *l);
/* Makes the descriptor readable; callable from any thread. */
void buzz__loop_wake(buzz_loop *l);
/*
** Arms the loop's one-shot timer to fire ms milliseconds from now,
** replacing any earlier due time; ms < 0 disarms it. While armed it keeps
** the loop alive (timeout counts down to it, wait returns when it fires);
** firing only ends the loop iteration. 0, or BUZZ_ELOOP.
*/
int buzz__loop_arm(buzz_loop *l, int64_t ms);
int buzz__loop_timeout(buzz_loop *l);    /* ms, -1 = no timer armed */
/* Waits for one round of loop activity; returns 0 if nothing can arrive. */
int buzz__loop_wait(buzz_loop *l, int is_writing);
/* SIGPIPE ignored unless the host handles it (http.c, redis.c). */
void buzz__ignore_sigpipe(void);
/* One non-blocking pass of the loop (a server's I/O: http.c). */
void buzz__loop_poll(buzz_loop *l);
/* Servers on the loop (http.c): +1 when one starts, -1 when it closes;
** while there are, timeout also counts their timers. */
void buzz__loop_io(buzz_loop *l, int delta);
/* The libuv loop (a uv_loop_t), for http.c. */
struct uv_loop_s *buzz__loop_uv(buzz_loop *l);

/* ---------------------------------------------------------------- dedup.c */

/*
** Idempotency keys: dedup key -> the id first published with it, kept for
** window_ms. CONSTRUCTOR: buzz__dedup_new()  DESTRUCTOR: buzz__dedup_free()
*/
typedef struct buzz_dedup buzz_dedup;

int buzz__dedup_new(buzz_dedup **out, int64_t window_ms);
void buzz__dedup_free(buzz_dedup *d);
/* The id published with key within the window before now, or 0. */
int64_t buzz__dedup_find(buzz_dedup *d, const char *key, size_t len,
                         int64_t now);
int buzz__dedup_put(buzz_dedup *d, const char *key, size_t len, int64_t id,
                    int64_t ts);
/* Forgets the keys of events lo..hi (their commit failed). */
void buzz__dedup_forget(buzz_dedup *d, int64_t lo, int64_t hi);
size_t buzz__dedup_count(const buzz_dedup *d);

/* match.c: does type match pattern (both valid)? For one-off checks. */
int buzz__subject_match(const char *pat, size_t plen, const char *type,
                        size_t tlen);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
