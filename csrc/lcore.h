/*
** lcore.h: the core object ("buzz.core" userdata) as the binding files
** see it. lbuzz.c owns it (module, lifecycle, the small methods);
** lpublish.c publishes; lsubscribe.c subscribes; ldurable.c is its store
** side (opening, the writer's news, the work due); the plain-C engine
** state it embeds and the files that work on it are engine.h's;
** ldispatch.c hands out deliveries; lhot.c holds the calls of the Lua
** layer's hot path (lua/buzz/hot.lua); lmetrics.c reports the counters; lstore.c the store's queries,
** consumers and state rows; lprefilter.c the where{} prefilter; lutil.c
** the module functions that need no bus and the helpers they share with
** the binding. Only binding files include this header (it needs the Lua
** headers, through compat.h).
*/
#ifndef BUZZ_LCORE_H
#define BUZZ_LCORE_H

#include "compat.h"
#include "engine.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif


/*
** The core object.
** CONSTRUCTOR: lcore_new()   DESTRUCTOR: lcore_close(); lcore_gc() is both
** __gc and __close
*/
typedef struct lcore {
  buzz_engine eng;     /* owns; embedded: the bus, the store, the dedup
                          keys and the commit gate (engine.h) */
  buzz_loop *loop;     /* owns; NULL once closed */
  size_t max_payload;  /* bytes of JSON a stored payload may take */
  int has_upcast;      /* upcasters are set: Lua upcasts durable pages, so
                          the core does not prefilter them (set_upcast) */
  int cur_slot;        /* U ref: the current event, false for none
                          (lcore_holder; released with U) */
  int depth_slot;      /* U ref: the publish_sync levels the hot path
                          (lua/buzz/hot.lua) has open, an integer it
                          keeps (lcore_holder; released with U) */
  int fail_slot;       /* U ref: false, or an array of store failures that
                          belong to no delivery, for Lua to report
                          (report_store, lcore_holder; released with U) */
  int ev_slot;         /* U ref kept for the table of the queued event
                          under delivery (push_event): reused for each
                          event instead of a luaL_ref and a luaL_unref per
                          event; false between events; released with U */
  int batch_ref;       /* U ref: the subs array of the last take at level
                          0 (LUA_NOREF until one; released with U) */
  int batch_prio;      /* the priority of the last event that take handed
                          out: a publish more urgent preempts (-1: none) */
  int is_open;
  int nsync;           /* publish_sync levels open (take() closes them) */
  int64_t published[BUZZ_NPRIO];  /* events published, by priority (the
                          hot path's included: core:sync_id) */
  int64_t refused_full;  /* publishes refused with EFULL (queue full) */
  struct lhttp *servers; /* bus:serve's servers on the loop (lhttp.c);
                          closed before the loop */
  struct lredis *redis;  /* bus:redis's connections on the loop
                          (lredis.c); closed before the loop */
} lcore;

#define SYNC_MAX 100   /* nested publish_sync deliveries; one more is
                          refused with EDEPTH (README, "Driving the bus") */
#define ERR_MAX BUZZ_ERR_MAX   /* err buffers, engine.h's size */

/* What on_event_free needs: the state, the stack slot of U and the core
** (whose ev_slot an event's table may be in). */
typedef struct lctx {
  lua_State *L;
  int u;
  struct lcore *c;
} lctx;

/*
** Upvalues of every method: the metatable (for the type check), then the
** strings the hot path uses as table keys and values, so building an
** event table never interns a C string.
*/
enum {
  UV_MT = 1, UV_ID, UV_TYPE, UV_PAYLOAD, UV_TS, UV_PRIORITY, UV_ATTEMPT,
  UV_KEY, UV_CORR, UV_CAUS, UV_HEADERS, UV_ACTIVE, UV_VERSION, UV_STREAM,
  UV_SVERSION, UV_PRIO0,
  UV_COUNT = UV_PRIO0 + BUZZ_NPRIO - 1
};


#define UV(i) lua_upvalueindex(i)

/*
** The core object at slot 1 of a method, or raises (not a core, or a
** closed one). Methods get the metatable as upvalue UV_MT, so the type
** check is one comparison (luaL_checkudata looks the name up in the
** registry). Inline: the per-delivery methods (ldispatch.c) call it.
*/
static inline lcore *buzz__lcore_check_fast(lua_State *L) {
  lcore *c = (lcore *)lua_touserdata(L, 1);
  if (c == NULL || !lua_getmetatable(L, 1) ||
      !lua_rawequal(L, -1, lua_upvalueindex(UV_MT)))
    c = (lcore *)luaL_checkudata(L, 1, "buzz.core");   /* raises */
  else
    lua_pop(L, 1);
  if (!c->is_open) luaL_error(L, "attempt to use a closed bus");
  return c;
}

/* Sets field k of the table on top to the integer v. */
static inline void buzz__set_field_int(lua_State *L, const char *k,
                                       int64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

/*
** lstore.c: the store's methods (query, consumers, remove_consumer,
** store_info, state_*), which luaopen_buzz_core registers with the
** upvalues above, and the page reader durable delivery uses (contract
** there: pushes an array of event tables, returns how many).
*/
extern const luaL_Reg buzz__lstore_methods[];
int buzz__lstore_read_page(lua_State *L, lcore *c, const buzz_query *q,
                           int is_strict, int64_t *bad_id);

/*
** lprefilter.c: the where{} prefilter. buzz__pf_holds: may ev pass the
** clauses at U[ref]? (stack: U at u; methods only: reads UV_PAYLOAD).
** buzz__pf_accept is the bus's accept hook (ctx an lctx);
** buzz__pf_register sets core.prefilter_ops and core.prefilter on the
** module table on top.
*/
int buzz__pf_holds(lua_State *L, int u, int ref, const buzz_event *ev);
int buzz__pf_accept(void *ctx, const buzz_sub *sub, const buzz_event *ev);
void buzz__pf_register(lua_State *L);

/*
** lutil.c: the module functions that need no bus, and two helpers.
** buzz__lsubject_usage pushes nil, 'bad <what> "<s>": <why>', "ESUBJECT"
** and returns 3 if s is not a valid subject (a '$' type is refused
** unless is_reserved_ok), else returns 0. buzz__ltraceback pushes msg (if
** not NULL) and a traceback of L1 from level up, ending before the first
** frame running the function at stop (an index of L, or 0).
*/
extern const luaL_Reg buzz__lutil_funcs[];
int buzz__lsubject_usage(lua_State *L, const char *what, const char *s,
                         size_t len, int is_pattern, int is_reserved_ok);
void buzz__ltraceback(lua_State *L, lua_State *L1, const char *msg,
                      int level, int stop);

/* lbuzz.c: the helpers the other binding files share (contracts there). */
lcore *buzz__lcore_check(lua_State *L);        /* check_core, out of line */
int buzz__lcore_refs(lua_State *L);            /* pushes U, its index */
int buzz__lcore_fail(lua_State *L, int rc, const char *detail);
void buzz__lcore_unref(lua_State *L, int u, int *ref);
void buzz__lcore_push_event(lua_State *L, lcore *c, int u, buzz_event *ev,
                            int from_args);

/* ldurable.c: the store side of the core object (contracts there). */
int buzz__lcore_store_fail(lua_State *L, int rc, const char *err);
int buzz__lcore_store_sync_watch(lua_State *L, lcore *c, int u,
                                 char *err, int64_t watch, int *is_lost);
int buzz__lcore_store_sync(lua_State *L, lcore *c, int u, char *err);
int buzz__lcore_store_flush(lua_State *L, lcore *c, int u, char *err);
void buzz__lcore_report_store(lua_State *L, lcore *c, int u,
                              const char *err);
void buzz__lcore_catch_up(lua_State *L, lcore *c);
void buzz__lcore_store_opts(lua_State *L, int t, buzz_store_opts *o);
void buzz__lcore_check_store_opts(lua_State *L, int t);
int buzz__lcore_open_store(lua_State *L, lcore *c, int t, int64_t now);
int buzz__lcore_has_work(lcore *c);
/* lhttp.c, lredis.c: requests or replies queued for the Lua layer (a
** pass of the loop made for one of them may have read the others'). */
int buzz__lhttp_has_queued(const lcore *c);
int buzz__lredis_has_replies(const lcore *c);
void buzz__lcore_signal_work(lcore *c);

/* lpublish.c: publish, publish_sync, current; and the EDEPTH helpers
** lhot.c shares (contracts there). */
extern const luaL_Reg buzz__lpublish_methods[];
int buzz__lcore_too_deep(lua_State *L, int levels);  /* EDEPTH */
int buzz__lcore_sync_levels(lua_State *L, lcore *c);

/* lsubscribe.c: subscribe, unsubscribe, set_handler, subs, audience. */
extern const luaL_Reg buzz__lsubscribe_methods[];

/* ldispatch.c: take, ack, wait_commit, is_writing, resume; and the
** result of a resume as coroutine.resume gives it. */
extern const luaL_Reg buzz__ldispatch_methods[];
int buzz__lcore_resumed(lua_State *L, lua_State *co, int rc, int nres);

/* lhttp.c: core:serve, the "buzz.http" server it makes, and the
** module's hmac_sha256, sha256 and equal_secret. */
extern const luaL_Reg buzz__lhttp_methods[];
extern const luaL_Reg buzz__lhttp_funcs[];
void buzz__lhttp_register(lua_State *L);
void buzz__lhttp_close_all(lcore *c);

/* lredis.c: core:redis and the "buzz.redis" connection it makes. */
extern const luaL_Reg buzz__lredis_methods[];
void buzz__lredis_register(lua_State *L);
void buzz__lredis_close_all(lcore *c);

/* lhot.c: core:sync_id, and core:ffi_sync_id (its FFI twin's address). */
int buzz__lhot_sync_id(lua_State *L);
int buzz__lhot_ffi_sync_id(lua_State *L);

/* lmetrics.c: core:metrics; core.histogram (registered on the module). */
int buzz__lmetrics(lua_State *L);
void buzz__lmetrics_register(lua_State *L);

/*
** Short names: the binding files call the shared functions above (and
** the prefilter's, lstore.c's page reader and the subject usage text) by
** the names they had as statics of lbuzz.c, so bodies moved between the
** files read the same. Each file picks its own check_core (the full
** check, buzz__lcore_check, or the inline one).
*/
#define accept_event buzz__pf_accept
#define catch_up buzz__lcore_catch_up
#define check_store_opts buzz__lcore_check_store_opts
#define has_work buzz__lcore_has_work
#define open_store buzz__lcore_open_store
#define pf_holds buzz__pf_holds
#define push_event buzz__lcore_push_event
#define push_fail buzz__lcore_fail
#define push_refs buzz__lcore_refs
#define push_store_fail buzz__lcore_store_fail
#define push_too_deep buzz__lcore_too_deep
#define sync_levels buzz__lcore_sync_levels
#define read_page buzz__lstore_read_page
#define report_store buzz__lcore_report_store
#define set_i buzz__set_field_int
#define signal_work buzz__lcore_signal_work
#define store_flush buzz__lcore_store_flush
#define store_opts buzz__lcore_store_opts
#define store_sync buzz__lcore_store_sync
#define store_sync_watch buzz__lcore_store_sync_watch
#define subject_usage buzz__lsubject_usage
#define unref buzz__lcore_unref

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
