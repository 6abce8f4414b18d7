/*
** lbuzz.c: the Lua binding of the core, module "buzz.core": the module's
** opening, the core object's lifecycle (new, close, __gc) and its small
** methods (pending, timeout, arm, fd, wait, flush, stats, holder,
** set_upcast), with the helpers every binding file shares (push_refs,
** push_fail, unref, the event table push_event builds). The other binding
** files (l*.c, sharing lcore.h) hold the rest: publish in lpublish.c,
** subscriptions in lsubscribe.c, the store side (opening, the writer's
** news, the work due) in ldurable.c, delivery in ldispatch.c; the plain-C
** engine under them is engine.c (the publish pipeline, the commit gate)
** and consumer.c (durable positions and pages).
**
** A core object ("buzz.core" userdata) embeds the engine (engine.h: the
** dispatcher, the store, the dedup keys) and owns the libuv loop. Its user value is the ref table U: every Lua value the core
** keeps (payloads, keys, headers, correlation ids, event tables, the Lua
** subscription objects) is a luaL_ref into U, released here when the core
** lets go of it (on_event_free, unsubscribe) or all at once when close()
** drops U. Lua's GC therefore traces everything the core holds.
**
** Conventions (STYLE.md): misuse the Lua layer can phrase better comes back
** as nil, message, "ESUBJECT"/"EINVAL" so lua/buzz/init.lua raises it at
** the caller's level; failures of the world come back as nil, "CODE:
** message", "CODE"; a method on a closed core raises. No malloc'd memory is
** held across a call that can raise: the core's allocations are owned by
** the core object, and strings are built in luaL_Buffer.
**
** Delivery is pulled, and the core never calls a handler: core:take
** (ldispatch.c) hands out what is due and lua/buzz/task.lua runs it;
** publish_sync (lpublish.c) opens a sync level and returns id, level for
** the Lua layer to take. While a handler runs, its event is current
** (U[cur_slot], which task.lua, hot.lua and core:resume set): publish
** inherits the correlation id from it and takes its id as the causation
** id. The core calls no Lua: store failures that belong to no delivery
** are kept in U[fail_slot] for the Lua layer to report (ldurable.c's
** report_store, core:holder), and Lua upcasts stored events itself.
**
** The hot path of the Lua layer (lua/buzz/hot.lua) has a call of its own
** in lhot.c (sync_id); lcore.h shares the core object and the helpers they
** need.
**
** It publishes nothing and subscribes nothing itself. The store's
** queries, consumers and state rows are lstore.c's; the where{}
** prefilter, lprefilter.c's; the module functions that need no bus (and
** the subject messages and tracebacks they share), lutil.c's.
*/
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "buzz.h"
#include "json.h"
#include "lcheck.h"
#include "lcore.h"

#define CORE_MT "buzz.core"

#if BUZZ_NOREF != LUA_NOREF
#error "BUZZ_NOREF must equal LUA_NOREF"
#endif

static const char *const uv_strings[] = {
  "id", "type", "payload", "ts", "priority", "attempt", "key",
  "correlation_id", "causation_id", "headers", "is_active", "version",
  "stream", "stream_version", "critical", "high", "normal", "low"
};


/* ------------------------------------------------------------ helpers */

#define check_core buzz__lcore_check_fast   /* see lcore.h's short names */

/* Pushes U and returns its absolute index. */
int buzz__lcore_refs(lua_State *L) {
  buzz_getuv(L, 1);
  return lua_gettop(L);
}

/* Returns nil, "CODE: message", "CODE" for a core error. */
int buzz__lcore_fail(lua_State *L, int rc, const char *detail) {
  lua_pushnil(L);
  if (detail)
    lua_pushfstring(L, "%s: %s", buzz__err_name(rc), detail);
  else
    lua_pushfstring(L, "%s: %s", buzz__err_name(rc), buzz__err_message(rc));
  lua_pushstring(L, buzz__err_name(rc));
  return 3;
}

void buzz__lcore_unref(lua_State *L, int u, int *ref) {
  if (*ref >= 0) luaL_unref(L, u, *ref);
  *ref = BUZZ_NOREF;
}

/* bus.c calls this when an event leaves the bus. ctx NULL: U is gone. */
static void on_event_free(void *ctx, buzz_event *ev) {
  lctx *x = (lctx *)ctx;
  if (x == NULL) return;
  unref(x->L, x->u, &ev->payload_ref);
  unref(x->L, x->u, &ev->key_ref);
  unref(x->L, x->u, &ev->corr_ref);
  unref(x->L, x->u, &ev->headers_ref);
  unref(x->L, x->u, &ev->stream_ref);
  if (ev->table_ref != BUZZ_NOREF && ev->table_ref == x->c->ev_slot) {
    lua_pushboolean(x->L, 0);          /* the slot stays the core's; its */
    lua_rawseti(x->L, x->u, ev->table_ref);  /* table may be collected */
    ev->table_ref = BUZZ_NOREF;
  }
  unref(x->L, x->u, &ev->table_ref);
}

/*
** Sets field UV(key) of the table on top from stack slot arg when arg is
** not 0 (and the slot holds a value), else moves the value of *ref.
*/
static void set_field(lua_State *L, int u, int *ref, int arg, int key) {
  if (arg != 0 && !lua_isnoneornil(L, arg)) {
    lua_pushvalue(L, UV(key));
    lua_pushvalue(L, arg);
    lua_rawset(L, -3);
  } else if (*ref != BUZZ_NOREF) {
    lua_pushvalue(L, UV(key));
    lua_rawgeti(L, u, *ref);
    lua_rawset(L, -3);
    unref(L, u, ref);
  }
}

static void set_int(lua_State *L, int key, int64_t v) {
  lua_pushvalue(L, UV(key));
  lua_pushinteger(L, (lua_Integer)v);
  lua_rawset(L, -3);
}

/*
** Pushes the event table of ev, building it on its first delivery. Its
** payload, key and headers come from the refs, or with from_args from the
** publish call's own arguments (slots 3, 5, 8, and 13 the stream;
** publish_sync needs no refs for them); the correlation id from slot 6 or
** its ref. The table is kept
** in U (table_ref) until the event leaves the bus, so every subscription
** receives the same table. A queued event (not from_args) keeps it in the
** core's ev_slot instead of a ref of its own: only the event at the head
** of the queue's cursor is being handed out at a time (core:take moves
** the cursor; the tables it handed out are the caller's), on_event_free
** empties the slot when it leaves, and one rawseti costs less than a
** luaL_ref and a luaL_unref per event. Only called from methods (uses
** the upvalues).
*/
void buzz__lcore_push_event(lua_State *L, lcore *c, int u, buzz_event *ev,
                            int from_args) {
  if (ev->table_ref != BUZZ_NOREF) {
    lua_rawgeti(L, u, ev->table_ref);
    return;
  }
  lua_createtable(L, 0, 8);  /* 6 fields always, 4 optional: 8 slots fit
                                the usual event; 10 would round up to 16 */
  set_int(L, UV_ID, ev->id);
  lua_pushvalue(L, UV(UV_TYPE));
  lua_pushlstring(L, ev->subject->type, ev->subject->len);
  lua_rawset(L, -3);
  set_field(L, u, &ev->payload_ref, from_args ? 3 : 0, UV_PAYLOAD);
  set_int(L, UV_TS, ev->ts);
  lua_pushvalue(L, UV(UV_PRIORITY));
  lua_pushvalue(L, UV(UV_PRIO0 + ev->priority));
  lua_rawset(L, -3);
  set_int(L, UV_ATTEMPT, 1);
  set_field(L, u, &ev->key_ref, from_args ? 5 : 0, UV_KEY);
  set_field(L, u, &ev->corr_ref, from_args ? 6 : 0, UV_CORR);
  if (ev->causation_id != 0) set_int(L, UV_CAUS, ev->causation_id);
  set_field(L, u, &ev->headers_ref, from_args ? 8 : 0, UV_HEADERS);
  if (ev->version != 0) set_int(L, UV_VERSION, ev->version);
  if (ev->stream_version != 0) {
    set_field(L, u, &ev->stream_ref, from_args ? 13 : 0, UV_STREAM);
    set_int(L, UV_SVERSION, ev->stream_version);
  }
  lua_pushvalue(L, -1);
  if (from_args || c->ev_slot == LUA_NOREF) {
    ev->table_ref = luaL_ref(L, u);    /* on_event_free releases it */
    if (!from_args) c->ev_slot = ev->table_ref;  /* kept from now on */
  } else {
    lua_rawseti(L, u, c->ev_slot);
    ev->table_ref = c->ev_slot;
  }
}

/* -------------------------------------------------------------- core */

/*
** core.new(queue_limit, opts) -> core | nil, err, code. opts
** (optional): dedup_window_ms, max_payload, now_ms (the bus's clock, for
** the dedup keys a store loads), and store = { path, durability (0 none,
** 1 batch, 2 sync), readonly, max_bytes, max_backlog, max_age_ms, max_events }. A
** number out of its range raises, naming the option.
*/
static int lcore_new(lua_State *L) {
  int64_t limit = buzz__opt_int(L, 1, "queue_limit", 100000, 0,
                                BUZZ_INT_EXACT);
  int64_t window = 0, max_payload = 0, now;
  lcore *c;
  int rc, has_opts = lua_istable(L, 2);
  lua_settop(L, 2);
  if (has_opts) {                      /* may raise: before acquiring */
    buzz_store_opts o;
    window = buzz__field_int(L, 2, "dedup_window_ms", 0, 0,
                             INT64_C(31536000000));   /* a year */
    max_payload = buzz__field_int(L, 2, "max_payload", 0, 0,
                                  BUZZ_INT_EXACT);
    lua_getfield(L, 2, "store");
    if (lua_istable(L, -1)) {
      check_store_opts(L, lua_gettop(L));
      store_opts(L, lua_gettop(L), &o);
    }
    lua_pop(L, 1);
  }
  now = has_opts ? buzz__field_int(L, 2, "now_ms", 0, 0, BUZZ_INT_EXACT) : 0;
  if (now == 0) now = buzz__clock_ms();
  c = (lcore *)buzz_newud(L, sizeof *c);
  memset(c, 0, sizeof *c);             /* closed until acquired */
  c->eng.bus.is_closed = 1;
  c->has_upcast = 0;
  c->ev_slot = LUA_NOREF;
  c->batch_ref = LUA_NOREF;
  c->batch_prio = -1;
  c->eng.dedup_window = window > 0 ? window : 120000;
  c->max_payload = max_payload > 0 ? (size_t)max_payload : 1048576;
  luaL_setmetatable(L, CORE_MT);
  lua_newtable(L);                     /* U */
  lua_pushboolean(L, 0);               /* U[fail_slot]: store failures */
  c->fail_slot = luaL_ref(L, -2);      /* for Lua to report, false: none */
  lua_pushboolean(L, 0);               /* U[cur_slot]: the current */
  c->cur_slot = luaL_ref(L, -2);       /* event, false for none */
  lua_pushinteger(L, 0);               /* U[depth_slot]: the hot path's */
  c->depth_slot = luaL_ref(L, -2);     /* publish_sync levels */
  buzz_setuv(L, -2);
  if ((rc = buzz__bus_init(&c->eng.bus, (size_t)limit)) < 0)
    return push_fail(L, rc, NULL);
  c->eng.bus.on_event_free = on_event_free;
  c->eng.bus.accept = accept_event;
  if ((rc = buzz__loop_new(&c->loop)) < 0) {
    buzz__bus_close(&c->eng.bus, NULL);
    return push_fail(L, rc, NULL);
  }
  if (has_opts) {
    lua_getfield(L, 2, "store");
    if (lua_istable(L, -1) && open_store(L, c, lua_gettop(L), now) != 0) {
      buzz__dedup_free(c->eng.dedup);  /* nil, err, code are on top */
      c->eng.dedup = NULL;
      buzz__store_close(c->eng.store);
      c->eng.store = NULL;
      buzz__bus_close(&c->eng.bus, NULL);
      buzz__loop_close(c->loop);
      c->loop = NULL;
      return 3;
    }
  }
  c->is_open = 1;
  lua_settop(L, 3);
  return 1;
}

/*
** core:close() -> number of pending events discarded. Idempotent; also
** __gc and __close, so it never raises.
*/
static int lcore_close(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  size_t n;
  if (!c->is_open) {
    lua_pushinteger(L, 0);
    return 1;
  }
  c->is_open = 0;                      /* mark closed before releasing */
  if (c->eng.bus.slots != NULL) {      /* tell live subscriptions */
    size_t i;
    buzz_getuv(L, 1);
    for (i = 0; i < c->eng.bus.nslots; i++) {
      buzz_sub *sub = c->eng.bus.slots[i];
      if (sub == NULL) continue;
      lua_rawgeti(L, -1, sub->data_ref);
      if (lua_istable(L, -1)) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "is_active");
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  buzz__consumer_save_all(&c->eng);   /* durable positions, before the
                                         writer stops */
  if (c->eng.store)                    /* the next session goes on from */
    buzz__ids_release(c->eng.store, c->eng.bus.last_id); /* here, no gap */
  n = buzz__bus_close(&c->eng.bus, NULL); /* U is dropped whole below */
  c->eng.ndurable = 0;
  buzz__store_close(c->eng.store);     /* commits what is left; before the
                                          loop, whose handle it wakes */
  c->eng.store = NULL;
  buzz__dedup_free(c->eng.dedup);
  c->eng.dedup = NULL;
  buzz__lhttp_close_all(c);            /* their handles close with it */
  buzz__lredis_close_all(c);
  buzz__loop_close(c->loop);
  c->loop = NULL;
  lua_newtable(L);
  buzz_setuv(L, 1);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

/* __gc and __close, one function: closes (idempotent, never raises). */
static int lcore_gc(lua_State *L) {
  luaL_checkudata(L, 1, CORE_MT);
  lcore_close(L);
  return 0;
}

static int lcore_is_closed(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lua_pushboolean(L, !c->is_open);
  return 1;
}

static int lcore_pending(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushinteger(L, (lua_Integer)buzz__bus_pending(&c->eng.bus));
  return 1;
}

/* core:timeout() -> ms until work is due: 0 now, -1 never (nothing armed) */
static int lcore_timeout(lua_State *L) {
  lcore *c = check_core(L);
  if (has_work(c)) lua_pushinteger(L, 0);
  else lua_pushinteger(L, buzz__loop_timeout(c->loop));
  return 1;
}

/*
** core:arm(ms) -> true. Arms the loop's one-shot timer to fire in ms
** milliseconds (an integer >= 0; arming again replaces the due time), or
** with -1 or nil disarms it. While it is armed, timeout() counts down to
** it and wait() returns when it fires; firing does nothing else.
*/
static int lcore_arm(lua_State *L) {
  lcore *c = check_core(L);
  int64_t ms = buzz__opt_int(L, 2, "ms (-1 or nil disarms)", -1, -1,
                             BUZZ_INT_EXACT);
  int rc;
  if ((rc = buzz__loop_arm(c->loop, (int64_t)ms)) < 0)
    return push_fail(L, rc, NULL);
  lua_pushboolean(L, 1);
  return 1;
}

/* core:fd() -> the descriptor a host polls; readable while work is due. */
static int lcore_fd(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushinteger(L, buzz__loop_fd(c->loop));
  signal_work(c);
  return 1;
}

/*
** core:wait() -> true after one round of loop activity, false if none can
** come (nothing pending, nothing armed, no write in flight). A write in
** flight is waited for here: its commit may give durable consumers work.
** An armed timer (arm()) is activity to come: wait() returns when it
** fires, or sooner.
*/
static int lcore_wait(lua_State *L) {
  lcore *c = check_core(L);
  if (has_work(c)) lua_pushboolean(L, 1);
  else lua_pushboolean(L, buzz__loop_wait(c->loop, c->eng.store != NULL &&
                                          !buzz__store_is_idle(c->eng.store)));
  return 1;
}

/* core:flush() -> true | nil, err, code: waits for every commit. */
static int lcore_flush(lua_State *L) {
  lcore *c = check_core(L);
  char err[ERR_MAX];
  int rc;
  if (c->eng.store == NULL) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if ((rc = store_flush(L, c, push_refs(L), err)) < 0)
    return push_store_fail(L, rc, err);
  lua_pushboolean(L, 1);
  return 1;
}

/*
** core:set_upcast(on): the bus has upcasters. Lua upcasts stored events
** as it reads them (lua/buzz/store.lua, task.lua); the core then leaves
** durable pages unprefiltered, since a prefilter would test the payload
** before its upcast (the subscription's own filter tests it after).
*/
static int lcore_set_upcast(lua_State *L) {
  check_core(L)->has_upcast = lua_toboolean(L, 2);
  return 0;
}

/*
** core:holder() -> U, slot, dslot, fslot: U[slot] is the current event
** (false: none). lua/buzz/task.lua and lua/buzz/hot.lua set it while they run a
** handler, as core:resume does while it resumes; publish inherits from
** it. U[dslot] is the number of publish_sync levels the hot path has
** open, which hot.lua keeps: with the core's own (nsync) they make the
** depth EDEPTH bounds. U[fslot] is false, or an array of store failures
** that belong to no delivery ("ESTORE: ..."), which Lua reports and
** clears (task.lua's failures): the core calls no reporter. U is the
** core's ref table: nothing else in it is for Lua to touch.
*/
static int lcore_holder(lua_State *L) {
  lcore *c = check_core(L);
  push_refs(L);
  lua_pushinteger(L, c->cur_slot);
  lua_pushinteger(L, c->depth_slot);
  lua_pushinteger(L, c->fail_slot);
  return 4;
}

static int lcore_stats(lua_State *L) {
  lcore *c = check_core(L);
  lua_createtable(L, 0, 6);
  set_i(L, "pending", (int64_t)buzz__bus_pending(&c->eng.bus));
  set_i(L, "subscriptions", (int64_t)c->eng.bus.nsubs);
  set_i(L, "last_id", c->eng.bus.last_id);
  set_i(L, "cached_types", (int64_t)buzz__trie_cached(c->eng.bus.trie));
  set_i(L, "type_misses", buzz__trie_misses(c->eng.bus.trie));
  set_i(L, "queue_limit", (int64_t)c->eng.bus.queue.limit);
  return 1;
}

static int lcore_tostring(lua_State *L) {
  lcore *c = (lcore *)luaL_checkudata(L, 1, CORE_MT);
  lua_pushfstring(L, "buzz.core (%s)", c->is_open ? "open" : "closed");
  return 1;
}


/* ------------------------------------------- for the other binding files */

/* check_core out of line, for lstore.c (lcore.h): the methods here use
** the inline check. */
lcore *buzz__lcore_check(lua_State *L) { return check_core(L); }

/*
** One test-only entry point remains: core.prefilter (lprefilter.c, only
** spec/filter_spec.lua). It is deliberately not compiled out without
** -DBUZZ_TESTING: `make` builds one core.so per interpreter that is both
** the build README hands users and the one the suite (and make asan,
** coverage, the Neovim and nginx host tests) loads, so gating it would
** either ship it anyway or make the suite test a core other than the
** shipped one. It goes once filter_spec.lua tests clauses through
** subscribe{ where }. (next and publish_cursor went with core:take.)
*/
static const luaL_Reg core_methods[] = {
  { "sync_id", buzz__lhot_sync_id },
  { "ffi_sync_id", buzz__lhot_ffi_sync_id },
  { "metrics", buzz__lmetrics },
  { "holder", lcore_holder },
  { "pending", lcore_pending },
  { "timeout", lcore_timeout },
  { "arm", lcore_arm },
  { "fd", lcore_fd },
  { "wait", lcore_wait },
  { "stats", lcore_stats },
  { "flush", lcore_flush },
  { "set_upcast", lcore_set_upcast },
  { "close", lcore_close },
  { "is_closed", lcore_is_closed },
  { NULL, NULL }
};

static const luaL_Reg module_funcs[] = {
  { "new", lcore_new },
  { NULL, NULL }
};

/* Pushes the UV_COUNT upvalues of every method (lcore.h): the metatable
** at mt, then the strings. */
static void push_upvalues(lua_State *L, int mt) {
  size_t i;
  lua_pushvalue(L, mt);                /* UV_MT: methods check against it */
  for (i = 0; i < sizeof uv_strings / sizeof uv_strings[0]; i++)
    lua_pushstring(L, uv_strings[i]);
}

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int luaopen_buzz_core(lua_State *L);

int luaopen_buzz_core(lua_State *L) {
  if (luaL_newmetatable(L, CORE_MT)) {
    lua_pushliteral(L, CORE_MT);       /* LuaJIT does not set __name */
    lua_setfield(L, -2, "__name");
    lua_newtable(L);
    push_upvalues(L, -2);
    luaL_setfuncs(L, core_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__lstore_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__ldispatch_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__lpublish_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__lsubscribe_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__lhttp_methods, UV_COUNT);
    push_upvalues(L, -2);
    luaL_setfuncs(L, buzz__lredis_methods, UV_COUNT);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, lcore_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, lcore_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, lcore_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, module_funcs, 0);
  luaL_setfuncs(L, buzz__lutil_funcs, 0);
  buzz__json_register(L);
  buzz__pf_register(L);
  buzz__lmetrics_register(L);
  buzz__lhttp_register(L);
  buzz__lredis_register(L);
  luaL_setfuncs(L, buzz__lhttp_funcs, 0);
  {                                    /* the error map: code -> meaning */
    size_t i;
    int code;
    lua_newtable(L);
    for (i = 0; (code = buzz__err_code(i)) != 0; i++) {
      lua_pushstring(L, buzz__err_message(code));
      lua_setfield(L, -2, buzz__err_name(code));
    }
    lua_setfield(L, -2, "errors");
  }
  lua_pushliteral(L, "0.2.0");   /* lua/buzz/init.lua: _VERSION */
  lua_setfield(L, -2, "version");
  return 1;
}

