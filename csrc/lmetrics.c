/*
** lmetrics.c: what the core counts, for lua/buzz/metrics.lua
** (bus:metrics(), the Prometheus text): events published by priority
** (lpublish.c and the hot path's lhot.c count them), publishes the full
** queue refused, events queued by priority (queue.c keeps the counts),
** and with a store the writer's figures: commits, events committed,
** failed, the backlog, the WAL, and the commit latency histogram the
** writer thread keeps (store.c). A binding file: lbuzz.c registers
** core:metrics with the core's methods.
**
** Also the fixed-bucket histograms the Lua layer observes sampled
** deliveries with (core.histogram: handler durations, publish -> handler
** latency): a binary search and a count, no allocation per observation.
**
** Invariants: every counter only grows while the bus is open; reading
** them allocates nothing in C and takes the writer's lock once. A
** histogram's counts are per bucket; read() makes them cumulative.
**
** It counts nothing per delivery: deliveries, failures, retries and
** handler durations are the Lua layer's (metrics.lua), where handlers
** run.
*/
#include <string.h>

#include "compat.h"
#include "buzz.h"
#include "store.h"
#include "lcheck.h"
#include "lcore.h"

#define check_core buzz__lcore_check   /* see lcore.h's short names */

static const char *const PRIO_NAMES[BUZZ_NPRIO] = {
  "critical", "high", "normal", "low"
};

/* Pushes { critical = v[0], high = v[1], normal = v[2], low = v[3] }. */
static void push_by_prio(lua_State *L, const int64_t *v) {
  int p;
  lua_createtable(L, 0, BUZZ_NPRIO);
  for (p = 0; p < BUZZ_NPRIO; p++) set_i(L, PRIO_NAMES[p], v[p]);
}

/* Pushes the commit latency histogram: { bounds = { seconds... },
** counts = { cumulative, the last one every commit }, sum = seconds,
** count }. */
static void push_commit_latency(lua_State *L, const buzz_store_stats *st) {
  static const int64_t bounds[BUZZ_COMMIT_BUCKETS] = BUZZ_COMMIT_BOUNDS_US;
  int64_t total = 0;
  int b;
  lua_createtable(L, 0, 4);
  lua_createtable(L, BUZZ_COMMIT_BUCKETS, 0);
  for (b = 0; b < BUZZ_COMMIT_BUCKETS; b++) {
    lua_pushnumber(L, (lua_Number)bounds[b] / 1e6);
    lua_rawseti(L, -2, b + 1);
  }
  lua_setfield(L, -2, "bounds");
  lua_createtable(L, BUZZ_COMMIT_BUCKETS + 1, 0);
  for (b = 0; b <= BUZZ_COMMIT_BUCKETS; b++) {
    total += st->commit_le[b];
    lua_pushinteger(L, (lua_Integer)total);
    lua_rawseti(L, -2, b + 1);
  }
  lua_setfield(L, -2, "counts");
  lua_pushnumber(L, (lua_Number)st->commit_us / 1e6);
  lua_setfield(L, -2, "sum");
  set_i(L, "count", total);
}

/*
** core:metrics() -> { published = by priority, queued = by priority,
** refused_full, store = { appended, committed, commits,
** failed, backlog_rows, backlog_bytes, refused, wal_bytes, checkpoints,
** commit_latency } | nil }. With a store whose size cannot be read,
** wal_bytes is left out (the rest still comes).
*/
int buzz__lmetrics(lua_State *L) {
  lcore *c = check_core(L);
  int64_t queued[BUZZ_NPRIO];
  int p;
  for (p = 0; p < BUZZ_NPRIO; p++)
    queued[p] = (int64_t)c->eng.bus.queue.nprio[p];
  lua_createtable(L, 0, 4);
  push_by_prio(L, c->published);
  lua_setfield(L, -2, "published");
  push_by_prio(L, queued);
  lua_setfield(L, -2, "queued");
  set_i(L, "refused_full", c->refused_full);
  if (c->eng.store != NULL) {
    buzz_store_stats st;
    int64_t first, last, bytes, wal;
    char err[ERR_MAX];
    buzz__store_stats(c->eng.store, &st);
    lua_createtable(L, 0, 10);
    set_i(L, "appended", st.appended);
    set_i(L, "committed", st.committed);
    set_i(L, "commits", st.commits);
    set_i(L, "failed", st.failed);
    set_i(L, "backlog_rows", st.pending);
    set_i(L, "backlog_bytes", st.backlog_bytes);
    set_i(L, "refused", st.refused);
    set_i(L, "checkpoints", st.checkpoints);
    if (buzz__store_size(c->eng.store, NULL, &first, &last, &bytes, &wal, err,
                         sizeof err) == 0)
      set_i(L, "wal_bytes", wal);
    push_commit_latency(L, &st);
    lua_setfield(L, -2, "commit_latency");
    lua_setfield(L, -2, "store");
  }
  return 1;
}


/* ---------------------------------------------------------- histograms */

#define HIST_MT "buzz.histogram"
#define HIST_MAX 32    /* bounds at most */

typedef struct lhist {
  int n;                        /* bounds */
  double bounds[HIST_MAX];      /* increasing upper bounds */
  lua_Integer counts[HIST_MAX + 1];  /* per bucket; [n]: beyond them */
  double sum;
  lua_Integer count;
} lhist;

static lhist *check_hist(lua_State *L) {
  return (lhist *)luaL_checkudata(L, 1, HIST_MT);
}

static void observe(lhist *h, double v) {
  int lo = 0, hi = h->n;               /* the bucket is in [lo, hi] */
  if (v != v) return;                  /* NaN: not an observation */
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (v <= h->bounds[mid]) hi = mid;
    else lo = mid + 1;
  }
  h->counts[lo]++;
  h->sum += v;
  h->count++;
}

/* core.histogram(bounds) -> a histogram with those upper bounds (a list
** of at most 32 increasing numbers; one more bucket counts the rest). */
static int l_histogram(lua_State *L) {
  lhist *h;
  int i, n;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = (int)buzz_rawlen(L, 1);
  luaL_argcheck(L, n >= 1 && n <= HIST_MAX, 1, "expected 1 to 32 bounds");
  h = (lhist *)lua_newuserdata(L, sizeof *h);
  memset(h, 0, sizeof *h);
  h->n = n;
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, 1, i + 1);
    if (!lua_isnumber(L, -1) ||
        (i > 0 && lua_tonumber(L, -1) <= h->bounds[i - 1]))
      return luaL_argerror(L, 1, "expected increasing numbers");
    h->bounds[i] = (double)lua_tonumber(L, -1);
    lua_pop(L, 1);
  }
  luaL_setmetatable(L, HIST_MT);
  return 1;
}

/* h:observe(v): counts the number v. */
static int l_observe(lua_State *L) {
  observe(check_hist(L), (double)luaL_checknumber(L, 2));
  return 0;
}

/* h:since(t0): counts the seconds since t0, a core.hrtime() reading. */
static int l_since(lua_State *L) {
  lhist *h = check_hist(L);
  double t0 = (double)luaL_checknumber(L, 2);
  double ns = (double)buzz__hrtime() - t0;
  observe(h, ns > 0 ? ns / 1e9 : 0);
  return 0;
}

/* h:age(ts [, now]) -> core.hrtime(): counts the seconds from ts to now
** (milliseconds since the epoch; now: the core's clock unless given), if
** ts is a number; returns the time, for a later h2:since(). */
static int l_age(lua_State *L) {
  lhist *h = check_hist(L);
  if (lua_type(L, 2) == LUA_TNUMBER) {
    double now = lua_type(L, 3) == LUA_TNUMBER
                 ? (double)lua_tonumber(L, 3) : (double)buzz__clock_ms();
    double ms = now - (double)lua_tonumber(L, 2);
    observe(h, ms > 0 ? ms / 1000 : 0);
  }
  lua_pushnumber(L, (lua_Number)buzz__hrtime());
  return 1;
}

/* h:read() -> { bounds = { ... }, counts = { cumulative; the last: all },
** sum, count }. */
static int l_read(lua_State *L) {
  lhist *h = check_hist(L);
  lua_Integer total = 0;
  int i;
  lua_createtable(L, 0, 4);
  lua_createtable(L, h->n, 0);
  for (i = 0; i < h->n; i++) {
    lua_pushnumber(L, (lua_Number)h->bounds[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "bounds");
  lua_createtable(L, h->n + 1, 0);
  for (i = 0; i <= h->n; i++) {
    total += h->counts[i];
    lua_pushinteger(L, total);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "counts");
  lua_pushnumber(L, (lua_Number)h->sum);
  lua_setfield(L, -2, "sum");
  lua_pushinteger(L, h->count);
  lua_setfield(L, -2, "count");
  return 1;
}

/* Puts core.histogram (and core.hist_age, core.hist_since: h:age and
** h:since) on the module table at the top of the stack. */
void buzz__lmetrics_register(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "observe", l_observe }, { "since", l_since }, { "age", l_age },
    { "read", l_read }, { NULL, NULL }
  };
  if (luaL_newmetatable(L, HIST_MT)) {
    lua_pushliteral(L, HIST_MT);       /* LuaJIT does not set __name */
    lua_setfield(L, -2, "__name");
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_histogram);
  lua_setfield(L, -2, "histogram");
  lua_pushcfunction(L, l_age);         /* the methods as plain functions: */
  lua_setfield(L, -2, "hist_age");     /* a sampled delivery calls them */
  lua_pushcfunction(L, l_since);       /* without a method lookup */
  lua_setfield(L, -2, "hist_since");
#ifdef BUZZ_NO_METRICS
  lua_pushboolean(L, 0);               /* bench/metrics_cost.sh's core */
#else
  lua_pushboolean(L, 1);
#endif
  lua_setfield(L, -2, "metrics_built");
}
