/*
** ldispatch.c: delivery, pulled. The Lua layer (lua/buzz/task.lua) asks
** the core for what is due and runs it; the core never calls a handler.
**
** core:take(max, subs, evs [, level, below]) -> n [, errs [, is_durable]]
** fills subs[1..n] and evs[1..n] (caller-owned arrays, reused from call
** to call; entries past n are left as they were) with the next n <= max
** deliveries: a subscription object and its event table, in queue order
** (priority, then FIFO; one event's subscriptions in subscription order).
** level 0 is the queue; level k the k-th nested publish_sync, whose
** deliveries core:publish_sync left open (it returns id, level). Once a
** level k > 0 has handed out its last delivery, the next take there
** returns 0 and closes the level. With a store, level 0 hands out only
** committed events (durability "batch" and "sync"): when the queue's
** head is not committed yet, take returns what it has and never waits;
** the writer's commit wakes the loop's descriptor (core:wait returns),
** and core:wait_commit waits where a caller must (drain). When the queue
** has nothing due, take hands out one page of a durable consumer's
** stored events instead (is_durable true); core:ack(sub_id, sub, ev_id)
** moves that consumer's position past each one once it has run, and its
** position reaches the writer at the next take. errs, when not nil, is an
** array of failures to report, three entries each: "CODE: message" (or
** the message of a stored event that does not decode), the event table
** or false, the subscription object or false. Stored events come as
** stored: the Lua layer upcasts them (task.lua), and with upcasters set
** (core:set_upcast) pages are not prefiltered, since the filter must see
** the upcast payload.
**
** Priority across a batch: a publish of an event more urgent than the
** last one the latest take at level 0 handed out sets subs.preempt to its
** priority; the Lua layer then takes with below (a priority), which hands
** out only events more urgent than below, before it goes on with the
** rest of its batch.
**
** A once subscription is ended in the core as it is handed out; the Lua
** layer marks its object inactive when it runs it. An unsubscribe after
** take and before the run is for the Lua layer to honour (is_active).
**
** core:resume(co, ev, ...) resumes a handler's thread while ev is the
** current event, from which publish inherits the correlation and
** causation ids; on Lua 5.4 with a fresh budget of C calls (see there).
** It is the only place the core resumes a thread.
**
** A binding file: it reads the arguments, builds the event tables, runs
** the prefilter on a page and fills subs, evs and errs. It does not keep
** the commit gate (engine.c decides what waits for its commit), nor a
** durable consumer's position or page (consumer.c does: which page comes
** next, where the position goes once it is done).
*/
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "compat.h"
#include "buzz.h"
#include "lcheck.h"
#include "lcore.h"

#define check_core buzz__lcore_check_fast   /* see lcore.h's short names */

/* Slots of take(): self, max, subs, evs, level, U, errs. */
enum { T_SUBS = 3, T_EVS = 4, T_U = 6, T_ERRS = 7 };

/*
** Appends err (the value on top, popped), ev and sub (stack slots, or 0
** for false) to errs at T_ERRS, made on first use.
*/
static void add_err(lua_State *L, int *nerr, int ev, int sub) {
  if (*nerr == 0) {
    lua_newtable(L);
    lua_replace(L, T_ERRS);
  }
  lua_rawseti(L, T_ERRS, ++*nerr);
  if (ev) lua_pushvalue(L, ev); else lua_pushboolean(L, 0);
  lua_rawseti(L, T_ERRS, ++*nerr);
  if (sub) lua_pushvalue(L, sub); else lua_pushboolean(L, 0);
  lua_rawseti(L, T_ERRS, ++*nerr);
}

static void add_store_err(lua_State *L, int *nerr, const char *err) {
  lua_pushfstring(L, "ESTORE: %s", err);
  add_err(L, nerr, 0, 0);
}

/* Puts sub's object and ev's table at n in subs and evs. */
static void hand_out(lua_State *L, lcore *c, buzz_sub *sub, buzz_event *ev,
                     int n) {
  lua_rawgeti(L, T_U, sub->data_ref);
  lua_rawseti(L, T_SUBS, n);
  if (sub->is_once) {                  /* the core ended it: its refs go */
    unref(L, T_U, &sub->data_ref);
    unref(L, T_U, &sub->fn_ref);
    unref(L, T_U, &sub->filter_ref);
  }
  push_event(L, c, T_U, ev, 0);
  lua_rawseti(L, T_EVS, n);
}

/*
** Hands out one page (at most max) of the first durable consumer that is
** behind the committed log and has no page out. Returns how many.
*/
static int take_durables(lua_State *L, lcore *c, lua_Integer max,
                         int *nerr) {
  char err[ERR_MAX];
  size_t i;
  if (store_sync(L, c, T_U, err) < 0) add_store_err(L, nerr, err);
  for (i = 0; i < c->eng.bus.nslots && c->is_open; i++) {
    buzz_sub *sub = c->eng.bus.slots[i];
    buzz_query q;
    int64_t bad, last = 0, read = 0, to;
    int k, j, n = 0, top = lua_gettop(L);
    if (!buzz__consumer_is_idle(sub)) continue;   /* a page out, or none */
    if (buzz__consumer_save(c->eng.store, sub, err) < 0)
      add_store_err(L, nerr, err);
    if (!buzz__consumer_query(sub, c->eng.committed, (int64_t)max, &q))
      continue;                        /* not behind */
    k = read_page(L, c, &q, 1, &bad);
    if (k < 0) {                       /* the position stays put */
      add_store_err(L, nerr, lua_tostring(L, -1));
      lua_settop(L, top);
      continue;
    }
    for (j = 1; j <= k; j++) {
      lua_rawgeti(L, top + 1, j);
      lua_getfield(L, -1, "id");
      read = (int64_t)lua_tointeger(L, -1);
      lua_pop(L, 1);
      if (sub->filter_ref != BUZZ_NOREF && !c->has_upcast) {
        buzz_event e;
        int holds;
        memset(&e, 0, sizeof e);
        lua_pushvalue(L, -1);
        e.table_ref = luaL_ref(L, T_U);
        e.payload_ref = e.key_ref = e.corr_ref = e.headers_ref = BUZZ_NOREF;
        holds = pf_holds(L, T_U, sub->filter_ref, &e);
        unref(L, T_U, &e.table_ref);
        if (!holds) {
          lua_pop(L, 1);
          continue;
        }
      }
      lua_rawseti(L, T_EVS, ++n);
      lua_rawgeti(L, T_U, sub->data_ref);
      lua_rawseti(L, T_SUBS, n);
      last = read;
    }
    if (bad > 0) {                     /* report it, skip that event */
      lua_rawgeti(L, T_U, sub->data_ref);            /* top+4 */
      lua_pushvalue(L, top + 2);
      add_err(L, nerr, top + 3, top + 4);
    }
    to = buzz__consumer_page_end(&q, k, bad, read);
    lua_settop(L, top);
    if (n == 0) {                      /* nothing passed: move on now */
      if (buzz__consumer_skip(c->eng.store, sub, to, err) < 0)
        add_store_err(L, nerr, err);
      continue;
    }
    buzz__consumer_page_out(sub, last, to);
    return n;
  }
  return 0;
}

/*
** May a take that has handed out something go on at level? Not past a
** level's last delivery (the take that finds none closes the level, so
** a publish_sync level counts toward EDEPTH while its handlers run), and
** not to a subscription with a prefilter: it must read the payload as
** the handlers before it left it.
*/
static int more_now(const lcore *c, size_t level) {
  const buzz_cursor *cur = &c->eng.bus.cursors[level];
  if (cur->ev == NULL || cur->vec == NULL) return level == 0;
  if (cur->i >= cur->vec->n) return level == 0;
  return cur->vec->subs[cur->i]->filter_ref == BUZZ_NOREF;
}

/*
** With below (a priority), may take go on at level 0? Only to events more
** urgent than below: the rest of an event already under way if it is,
** else the queue's head if it is.
*/
static int is_urgent(const lcore *c, int below) {
  const buzz_cursor *cur = &c->eng.bus.cursors[0];
  int p;
  if (cur->ev != NULL && cur->vec != NULL && cur->i < cur->vec->n)
    return cur->ev->priority < below;  /* its subscriptions are not done */
  for (p = 0; p < BUZZ_NPRIO && !c->eng.bus.queue.head[p]; p++) {}
  return p < below;
}

static int lcore_take(lua_State *L) {
  lcore *c = check_core(L);
  int is_int;                          /* the usual call: a small max, */
  lua_Integer max = lua_tointegerx(L, 2, &is_int);    /* no level */
  int64_t level = 0;
  int below = BUZZ_NPRIO;
  if (!is_int || max < 0 || max > BUZZ_INT_EXACT)
    max = (lua_Integer)buzz__check_int(L, 2, "max", 0, BUZZ_INT_EXACT);
  if (lua_gettop(L) >= 5) {
    level = buzz__opt_int(L, 5, "level", 0, 0, INT_MAX);
    below = (int)buzz__opt_int(L, 6, "below", BUZZ_NPRIO, 0, BUZZ_NPRIO);
  }
  int n = 0, nerr = 0, is_durable = 0, prio = -1;
  lctx ctx;
  luaL_checktype(L, T_SUBS, LUA_TTABLE);
  luaL_checktype(L, T_EVS, LUA_TTABLE);
  lua_settop(L, 5);                    /* below is read */
  ctx.L = L;
  ctx.c = c;
  ctx.u = push_refs(L);                /* T_U */
  lua_pushnil(L);                      /* T_ERRS */
  if (level > 0 && (size_t)level >= c->eng.bus.depth) max = 0; /* closed */
  if (max > INT_MAX) max = INT_MAX;
  while (n < max && c->is_open) {
    buzz_sub *sub;
    buzz_event *ev;
    int rc;
    if (n > 0 && !more_now(c, (size_t)level)) break;
    if (below < BUZZ_NPRIO && (level > 0 || !is_urgent(c, below))) break;
    if (level == 0) {
      buzz__engine_arm_gate(&c->eng);  /* never deliver uncommitted */
      c->eng.bus.has_below = below < BUZZ_NPRIO;   /* nor, preempting, */
      c->eng.bus.below = below;                    /* a less urgent one */
    }
    rc = buzz__bus_next(&c->eng.bus, (size_t)level, &sub, &ev, &ctx);
    if (rc == 0 && level == 0 && c->eng.bus.is_gated) {
      char err[ERR_MAX];
      int64_t was = c->eng.committed;
      int had = nerr;
      if (store_sync(L, c, T_U, err) < 0) add_store_err(L, &nerr, err);
      if (c->eng.committed != was || nerr != had) continue;
      break;                           /* the commit wakes the fd */
    }
    if (rc < 0) {
      lua_pushfstring(L, "%s: %s", buzz__err_name(rc),
                      buzz__err_message(rc));
      add_err(L, &nerr, 0, 0);
      break;
    }
    if (rc == 0) {
      if (level > 0) c->nsync--;       /* the level is closed */
      break;
    }
    hand_out(L, c, sub, ev, ++n);
    prio = ev->priority;
  }
  if (level == 0 && below == BUZZ_NPRIO && n > 0) {
    if (c->batch_ref == LUA_NOREF) {   /* preempt goes to this array */
      lua_pushvalue(L, T_SUBS);
      c->batch_ref = luaL_ref(L, T_U);
    } else {
      lua_pushvalue(L, T_SUBS);
      lua_rawseti(L, T_U, c->batch_ref);
    }
    c->batch_prio = prio;
  }
  c->eng.bus.has_gate = 0;
  c->eng.bus.has_below = 0;
  if (n == 0 && level == 0 && max > 0 && c->is_open && c->eng.store &&
      c->eng.ndurable > 0) {
    n = take_durables(L, c, max, &nerr);
    is_durable = n > 0;
  }
  if (level == 0 && c->is_open && n < max) signal_work(c);
  lua_pushinteger(L, n);
  if (nerr == 0 && !is_durable) return 1;
  lua_pushvalue(L, T_ERRS);
  lua_pushboolean(L, is_durable);
  return 3;
}

/*
** core:ack(sub_id, sub, ev_id): the durable consumer sub (its id and
** object) has run its delivery of the stored event ev_id: its position
** moves past it (past the rest of its page, filtered or undecodable
** events included, after the page's last delivery). Nothing for a sub
** that has ended.
*/
static int lcore_ack(lua_State *L) {
  lcore *c = check_core(L);
  int64_t id = buzz__check_int(L, 2, "sub_id", 1, BUZZ_INT_EXACT);
  int64_t ev_id = buzz__check_int(L, 4, "ev_id", 1, BUZZ_INT_EXACT);
  buzz_sub *sub = buzz__bus_sub(&c->eng.bus, id);
  int u;
  if (sub == NULL || sub->durable == NULL || sub->is_dead) return 0;
  u = push_refs(L);
  lua_rawgeti(L, u, sub->data_ref);
  if (!lua_rawequal(L, -1, 3)) return 0;
  buzz__consumer_ack(sub, ev_id);
  return 0;
}

/*
** core:wait_commit() -> true | false [, err]: with writes in flight that
** hold up a delivery (queued events, or durable consumers, which read
** the committed log), waits for their commit (blocking the caller: only
** where it must, as step and drain do) and returns true, with the
** message of a failed group; true too when a commit came whose news was
** not taken yet; false when there was nothing to wait for.
*/
static int lcore_wait_commit(lua_State *L) {
  lcore *c = check_core(L);
  char err[ERR_MAX];
  int rc;
  if (c->eng.store == NULL ||
      (buzz__bus_pending(&c->eng.bus) == 0 && c->eng.ndurable == 0)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (!buzz__store_is_idle(c->eng.store)) {
    rc = store_flush(L, c, push_refs(L), err);
  } else if (buzz__store_committed(c->eng.store) > c->eng.committed) {
    rc = store_sync(L, c, push_refs(L), err);  /* news not taken yet */
  } else {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushboolean(L, 1);
  if (rc < 0) {
    lua_pushfstring(L, "ESTORE: %s", err);
    return 2;
  }
  return 1;
}

/* core:is_writing() -> are writes in flight (a commit will wake the fd)? */
static int lcore_is_writing(lua_State *L) {
  lcore *c = check_core(L);
  lua_pushboolean(L, c->eng.store != NULL &&
                  !buzz__store_is_idle(c->eng.store));
  return 1;
}


/* ------------------------------------------------------------- resume */

/*
** Why co cannot be resumed from L, as coroutine.resume words it, or NULL
** if it can: suspended in a yield, or a fresh thread with its function.
*/
static const char *resume_refusal(lua_State *L, lua_State *co) {
  lua_Debug ar;
  if (co == L) return "cannot resume non-suspended coroutine";
  switch (lua_status(co)) {
  case LUA_YIELD:
    return NULL;
  case LUA_OK:
    if (lua_getstack(co, 0, &ar)) return "cannot resume non-suspended "
                                         "coroutine";  /* it is running */
    return lua_gettop(co) == 0 ? "cannot resume dead coroutine" : NULL;
  default:                             /* it raised */
    return "cannot resume dead coroutine";
  }
}

/*
** After lua_resume(co) gave rc with nres results on co: pushes true and
** them, or false and the error value (false and "too many results to
** resume" when L has no room). Returns how many values it pushed.
*/
int buzz__lcore_resumed(lua_State *L, lua_State *co, int rc, int nres) {
  if (rc == LUA_OK || rc == LUA_YIELD) {
    if (!lua_checkstack(L, nres + 1)) {
      lua_pop(co, nres);
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "too many results to resume");
      return 2;
    }
    lua_pushboolean(L, 1);
    lua_xmove(co, L, nres);
    return nres + 1;
  }
  lua_pushboolean(L, 0);
  lua_xmove(co, L, 1);                 /* the error value */
  return 2;
}

/*
** Is co a thread with nothing to resume (never run, or run to its end,
** its results taken): one core:resume may start a function in?
*/
static int is_idle(lua_State *L, lua_State *co) {
  lua_Debug ar;
  return co != L && lua_status(co) == LUA_OK && lua_gettop(co) == 0 &&
         !lua_getstack(co, 0, &ar);
}

/* Is the value at idx a function, or has it a __call metamethod? */
static int is_callable(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  if (t == LUA_TFUNCTION) return 1;
  if (t != LUA_TTABLE && t != LUA_TUSERDATA) return 0;
  if (luaL_getmetafield(L, idx, "__call") == LUA_TNIL) return 0;
  lua_pop(L, 1);
  return 1;
}

/*
** core:resume(co, ev, ...) -> true, ... | false, err. Resumes the thread
** co with the extra arguments and returns as coroutine.resume does: true
** and what co yielded or returned, or false and the error value (co is
** then left as it is, for debug.traceback(co, err)). While co runs, the
** table ev is the current event: a publish inside co inherits
** ev.correlation_id and takes ev.id (an integer) as its causation id,
** both read raw when it publishes, as in a handler of ev; ev
** nil means no current event, even inside a handler; the outer one is
** current again when the resume returns. On Lua 5.4 the resume starts a
** fresh budget of C calls
** (limit 200): nested publish_sync deliveries would otherwise share one
** and run out at 65 levels; SYNC_MAX bounds the nesting instead, as on
** LuaJIT, which does not count resumes. Never raises for co's sake.
** Stack: self, co, ev at 1..3, the arguments from 4.
**
** core:resume(co, ev, fn, ...) with co idle (is_idle) and fn callable
** starts fn(...) in co -> true, true when it returned (its results
** dropped; co is idle again, to be reused: a pool of threads needs no
** yield per run, which costs a longjmp on Lua 5.4); true, false and what
** it yielded; or false, err.
*/
static int lcore_resume(lua_State *L) {
  lcore *c = check_core(L);
  lua_State *co = lua_tothread(L, 2);
  const char *why;
  int nargs, u, rc, nres = 0, has_ev, is_start = 0;
  if (co == NULL) luaL_checktype(L, 2, LUA_TTHREAD);
  has_ev = !lua_isnoneornil(L, 3);
  luaL_argcheck(L, !has_ev || lua_istable(L, 3), 3,
                "expected an event table or nil");
  if (lua_gettop(L) < 3) lua_settop(L, 3);
  nargs = lua_gettop(L) - 3;
  if (is_callable(L, 4) && is_idle(L, co)) {
    is_start = 1;                      /* the function is no argument */
    why = lua_checkstack(co, nargs) ? NULL : "too many arguments to resume";
  } else if ((why = resume_refusal(L, co)) == NULL &&
             !lua_checkstack(co, nargs)) {
    why = "too many arguments to resume";
  }
  if (why != NULL) {
    lua_pushboolean(L, 0);
    lua_pushstring(L, why);
    return 2;
  }
  lua_xmove(L, co, nargs);             /* the arguments */
  u = push_refs(L);                    /* slot 4 */
  lua_rawgeti(L, u, c->cur_slot);      /* slot 5: the outer event */
  if (has_ev) lua_pushvalue(L, 3);     /* ev is current while co runs; */
  else lua_pushboolean(L, 0);          /* nil hides an outer event */
  lua_rawseti(L, u, c->cur_slot);
#if LUA_VERSION_NUM >= 504
  rc = lua_resume(co, NULL, nargs - is_start, &nres);
#else
  rc = buzz_resume_n(co, L, nargs - is_start, &nres);
#endif
  if (c->is_open) {                    /* else U went with close() */
    lua_pushvalue(L, 5);
    lua_rawseti(L, u, c->cur_slot);
  }
  if (!is_start || (rc != LUA_OK && rc != LUA_YIELD))
    return buzz__lcore_resumed(L, co, rc, nres);
  if (rc == LUA_OK) {                  /* returned: idle again */
    lua_settop(co, 0);
    lua_pushboolean(L, 1);
    lua_pushboolean(L, 1);
    return 2;
  }
  if (!lua_checkstack(L, nres + 2)) {  /* co stays suspended */
    lua_pop(co, nres);
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "too many results to resume");
    return 2;
  }
  lua_pushboolean(L, 1);               /* true, false, what it yielded */
  lua_pushboolean(L, 0);
  lua_xmove(co, L, nres);
  return 2 + nres;
}

const luaL_Reg buzz__ldispatch_methods[] = {
  { "take", lcore_take },
  { "ack", lcore_ack },
  { "wait_commit", lcore_wait_commit },
  { "is_writing", lcore_is_writing },
  { "resume", lcore_resume },
  { NULL, NULL }
};
