/*
** lutil.c: the module functions of buzz.core that need no bus
** (check_subject, match, traceback, now_ms, hrtime, pid,
** publish_options),
** registered from buzz__lutil_funcs by luaopen_buzz_core, and the two
** helpers they share
** with the rest of the binding: the usage message for a bad subject
** (buzz__lsubject_usage: subscribe, publish and audience word their
** refusals with it) and the traceback of a failed delivery
** (buzz__ltraceback: core.traceback, for the Lua layer's reports).
**
** No state, no core object: everything here works on its arguments and
** the stack. Nothing raises except for misuse of the module functions
** themselves (luaL_check*); the helpers build their strings in
** luaL_Buffer or with lua_pushfstring, so no malloc'd memory is held.
*/
#include <limits.h>
#include <string.h>
#include <unistd.h>

#include "compat.h"
#include "buzz.h"
#include "lcheck.h"
#include "lcore.h"


/* ------------------------------------------------------------ subjects */

/* Pushes s quoted, with control bytes escaped and long strings cut. */
static void push_quoted(lua_State *L, const char *s, size_t len) {
  luaL_Buffer b;
  size_t i, n = len > 64 ? 64 : len;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '"');
  for (i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch < 0x20 || ch == 0x7f || ch == '"' || ch == '\\') {
      char esc[8];
      int k = 0;
      esc[k++] = '\\';
      if (ch == '"' || ch == '\\') esc[k++] = (char)ch;
      else {
        esc[k++] = (char)('0' + ch / 100);
        esc[k++] = (char)('0' + ch / 10 % 10);
        esc[k++] = (char)('0' + ch % 10);
      }
      luaL_addlstring(&b, esc, (size_t)k);
    } else {
      luaL_addchar(&b, (char)ch);
    }
  }
  if (n < len) luaL_addstring(&b, "...");
  luaL_addchar(&b, '"');
  luaL_pushresult(&b);
}

/*
** Returns nil, 'bad <what> "<s>": <why>', "ESUBJECT" if s is not a valid
** subject (pushing 3 values), or 0 if it is. A type starting with '$' is
** refused unless is_reserved_ok (the engine's own types, inspection).
*/
int buzz__lsubject_usage(lua_State *L, const char *what, const char *s,
                         size_t len, int is_pattern, int is_reserved_ok) {
  const char *why = buzz__subject_check(s, len, is_pattern);
  if (why == NULL) {
    if (is_pattern || is_reserved_ok || s[0] != '$') return 0;
    why = "subjects starting with \"$\" are reserved for the engine "
          "($DLQ.>, $SYS.>); publish a type without the leading \"$\"";
  }
  lua_pushnil(L);
  lua_pushfstring(L, "bad %s ", what);
  push_quoted(L, s, len);
  lua_pushfstring(L, ": %s", why);
  lua_concat(L, 3);
  lua_pushliteral(L, "ESUBJECT");
  return 3;
}


/* ---------------------------------------------------------- tracebacks */

#define TRACE_FRAMES 22 /* frames a traceback shows at most */
#if LUA_VERSION_NUM >= 502
#define BUZZ_TRACE_INFO "Slnt"
#else
#define BUZZ_TRACE_INFO "Sln"
#endif

/* Adds the decimal digits of n to b (snprintf costs ten times more). */
static void add_int(luaL_Buffer *b, int n) {
  char d[16];
  int i = 0;
  unsigned u = n < 0 ? 0u - (unsigned)n : (unsigned)n;
  if (n < 0) luaL_addchar(b, '-');
  do d[i++] = (char)('0' + u % 10); while ((u /= 10) != 0);
  while (i > 0) luaL_addchar(b, d[--i]);
}

/*
** Pushes msg (if not NULL) and a traceback of L1 from level up, worded as
** luaL_traceback words it but without naming functions after the fields
** of package.loaded: Lua 5.4 searches those tables for every frame, tens
** of microseconds per failure, and every failed attempt of a retried
** delivery takes a traceback. A frame's own name (local, method, field,
** upvalue) is kept. With stop (a stack index of L, or 0), the traceback
** ends before the first frame that runs the function there: the Lua
** layer stops at its own xpcall, so that only the handler's frames show.
** L1 may be L.
*/
void buzz__ltraceback(lua_State *L, lua_State *L1, const char *msg,
                      int level, int stop) {
  luaL_Buffer b;
  lua_Debug ar;
  int n = 0;
  luaL_buffinit(L, &b);
  if (msg) {
    luaL_addstring(&b, msg);
    luaL_addchar(&b, '\n');
  }
  luaL_addstring(&b, "stack traceback:");
  while (lua_getstack(L1, level++, &ar)) {
    if (n++ == TRACE_FRAMES) {
      luaL_addstring(&b, "\n\t...");
      break;
    }
    if (stop) {                        /* balanced, as a buffer allows */
      int is_stop;
      lua_getinfo(L1, "f", &ar);
      if (L1 != L) lua_xmove(L1, L, 1);
      is_stop = lua_rawequal(L, -1, stop);
      lua_pop(L, 1);
      if (is_stop) break;
    }
    lua_getinfo(L1, BUZZ_TRACE_INFO, &ar);  /* pushes nothing */
    luaL_addstring(&b, "\n\t");
    luaL_addstring(&b, ar.short_src);
    if (ar.currentline > 0) {
      luaL_addchar(&b, ':');
      add_int(&b, ar.currentline);
    }
    luaL_addstring(&b, ": in ");
    if (ar.namewhat && *ar.namewhat) {
      luaL_addstring(&b, strcmp(ar.namewhat, "global") == 0 ? "function"
                     : ar.namewhat);
      luaL_addstring(&b, " '");
      luaL_addstring(&b, ar.name ? ar.name : "?");
      luaL_addchar(&b, '\'');
    } else if (*ar.what == 'm') {
      luaL_addstring(&b, "main chunk");
    } else if (*ar.what == 'C') {
      luaL_addchar(&b, '?');
    } else {
      luaL_addstring(&b, "function <");
      luaL_addstring(&b, ar.short_src);
      luaL_addchar(&b, ':');
      add_int(&b, ar.linedefined);
      luaL_addchar(&b, '>');
    }
#if LUA_VERSION_NUM >= 502
    if (ar.istailcall) luaL_addstring(&b, "\n\t(...tail calls...)");
#endif
  }
  luaL_pushresult(&b);
}


/* ---------------------------------------------------- module functions */

/*
** core.check_subject(s, is_pattern) -> true | false, message. The message
** is the one subscribe and publish raise ('bad pattern "a..b": ...');
** reserved '$' types count as valid here.
*/
static int l_check_subject(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int is_pattern = lua_toboolean(L, 2);
  if (!buzz__lsubject_usage(L, is_pattern ? "pattern" : "type", s, len,
                            is_pattern, 1)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pop(L, 1);                       /* nil, message, code -> */
  lua_pushboolean(L, 0);               /* false, message */
  lua_replace(L, -3);
  return 2;
}

/*
** core.match(pattern, type) -> boolean: does type match pattern, by the
** trie's rules ('$' types too)? Either one malformed raises its message.
*/
static int l_match(lua_State *L) {
  size_t plen, tlen;
  const char *pat = luaL_checklstring(L, 1, &plen);
  const char *type = luaL_checklstring(L, 2, &tlen);
  if (buzz__lsubject_usage(L, "pattern", pat, plen, 1, 1) ||
      buzz__lsubject_usage(L, "type", type, tlen, 0, 1))
    return luaL_error(L, "%s", lua_tostring(L, -2));
  lua_pushboolean(L, buzz__subject_match(pat, plen, type, tlen));
  return 1;
}

/*
** core.traceback([thread,] msg, level, stop) -> string: as debug.traceback,
** with push_traceback's wording (no names looked up in package.loaded). A
** msg that is neither a string nor nil is returned as it is. level counts
** from the caller (1, the default) or from the thread's top (0). With
** stop, a function, the traceback ends before the first frame running it.
*/
static int l_traceback(lua_State *L) {
  lua_State *L1 = L;
  int arg = 0, level, stop = 0;
  const char *msg;
  if (lua_type(L, 1) == LUA_TTHREAD) {
    L1 = lua_tothread(L, 1);
    arg = 1;
  }
  msg = lua_tostring(L, arg + 1);
  if (msg == NULL && !lua_isnoneornil(L, arg + 1)) {
    lua_pushvalue(L, arg + 1);
    return 1;
  }
  level = (int)buzz__opt_int(L, arg + 2, "level", L1 == L ? 1 : 0, 0,
                             INT_MAX);
  if (!lua_isnoneornil(L, arg + 3)) {
    luaL_checktype(L, arg + 3, LUA_TFUNCTION);
    stop = arg + 3;
  }
  buzz__ltraceback(L, L1, msg, level, stop);
  return 1;
}

/* core.now_ms() -> the clock the core stamps events with */
static int l_now_ms(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)buzz__clock_ms());
  return 1;
}

/* core.pid() -> this process's id (a bus's name among the metrics that
** buses write to a shared store) */
static int l_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

/* core.hrtime() -> nanoseconds from an arbitrary point (uv_hrtime), for
** latency measurements */
static int l_hrtime(lua_State *L) {
  lua_pushnumber(L, (lua_Number)buzz__hrtime());
  return 1;
}

/* ---------------------------------------------------- publish options */

enum { PO_KEY = 1, PO_PRIORITY, PO_CORR, PO_HEADERS, PO_DEDUP, PO_VERSION,
       PO_N = PO_VERSION,
       PO_STREAM              /* stream, expect: lua/buzz/stream.lua's */
};

/* Which publish option the string key at idx names (PO_*), or 0: the
** later ones (delay, at) and unknown keys alike, which the Lua layer's
** validator (lua/buzz/options.lua) takes. */
static int po_name(lua_State *L, int idx) {
  size_t n;
  const char *k = lua_tolstring(L, idx, &n);
  switch (n) {
  case 3: return memcmp(k, "key", 3) == 0 ? PO_KEY : 0;
  case 5: return memcmp(k, "dedup", 5) == 0 ? PO_DEDUP : 0;
  case 6: return memcmp(k, "stream", 6) == 0 || memcmp(k, "expect", 6) == 0
               ? PO_STREAM : 0;
  case 7: return memcmp(k, "headers", 7) == 0 ? PO_HEADERS
               : memcmp(k, "version", 7) == 0 ? PO_VERSION : 0;
  case 8: return memcmp(k, "priority", 8) == 0 ? PO_PRIORITY : 0;
  case 14: return memcmp(k, "correlation_id", 14) == 0 ? PO_CORR : 0;
  default: return 0;
  }
}

/* Is the value at idx a headers table: no metatable (pairs could see
** other entries than lua_next does), only string names and values? */
static int po_headers(lua_State *L, int idx) {
  if (!lua_istable(L, idx) || lua_getmetatable(L, idx)) {
    if (lua_istable(L, idx)) lua_pop(L, 1);
    return 0;
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING) {
      lua_pop(L, 2);
      return 0;
    }
    lua_pop(L, 1);
  }
  return 1;
}

/* Is the value at idx (option o) one the validator would take as it is? */
static int po_valid(lua_State *L, int o, int idx) {
  int64_t i;
  size_t n;
  switch (o) {
  case PO_KEY:
    return lua_type(L, idx) == LUA_TSTRING ||
           buzz__to_int(L, idx, -BUZZ_INT_EXACT, BUZZ_INT_EXACT, &i);
  case PO_CORR: return lua_type(L, idx) == LUA_TSTRING;
  case PO_HEADERS: return po_headers(L, idx);
  case PO_DEDUP:
    return lua_type(L, idx) == LUA_TSTRING &&
           (lua_tolstring(L, idx, &n), n > 0);
  case PO_VERSION: return buzz__to_int(L, idx, 1, INT_MAX, &i);
  default: return 0;
  }
}

/* The number of a priority's name, or -1. */
static int po_priority(lua_State *L, int idx) {
  static const char *const names[] = { "critical", "high", "normal", "low" };
  const char *s;
  int p;
  if (lua_type(L, idx) != LUA_TSTRING) return -1;
  s = lua_tostring(L, idx);
  for (p = 0; p < 4; p++)
    if (strcmp(s, names[p]) == 0) return p;
  return -1;
}

/*
** core.publish_options(opts) -> priority (0..3), key, correlation_id,
** headers, dedup, version (each as given, or nil) | nothing; stream and
** expect are passed over (the caller checked them). The fast
** reading of publish's options: one pass in C over a table of valid
** options, where lua/buzz/options.lua's pass costs a call per key. It
** returns nothing for whatever it does not take as it is (not a table,
** an unknown option, delay or at, a value of the wrong type or out of
** range): the Lua validator then reads the options again, and raises
** with its message, or handles delay and at. Never raises.
*/
static int l_publish_options(lua_State *L) {
  int prio = 2, o;
  if (!lua_istable(L, 1)) return 0;
  lua_settop(L, 1);
  lua_settop(L, 1 + PO_N);             /* slots 2..7: the values */
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    o = lua_type(L, -2) == LUA_TSTRING ? po_name(L, -2) : 0;
    if (o == PO_STREAM) {              /* checked before (stream.lua) */
      lua_pop(L, 1);
      continue;
    } else if (o == PO_PRIORITY) {
      if ((prio = po_priority(L, -1)) < 0) return 0;
    } else if (o == 0 || !po_valid(L, o, lua_gettop(L))) {
      return 0;
    }
    lua_replace(L, 1 + o);             /* (priority's slot: unused) */
  }
  lua_pushinteger(L, prio);
  lua_replace(L, 1 + PO_PRIORITY);
  /* priority, key, correlation_id, headers, dedup, version */
  lua_pushvalue(L, 1 + PO_PRIORITY);
  lua_pushvalue(L, 1 + PO_KEY);
  lua_pushvalue(L, 1 + PO_CORR);
  lua_pushvalue(L, 1 + PO_HEADERS);
  lua_pushvalue(L, 1 + PO_DEDUP);
  lua_pushvalue(L, 1 + PO_VERSION);
  return 6;
}

/* The functions of this file; luaopen_buzz_core puts them on the module
** table. */
const luaL_Reg buzz__lutil_funcs[] = {
  { "check_subject", l_check_subject },
  { "now_ms", l_now_ms },
  { "traceback", l_traceback },
  { "match", l_match },
  { "hrtime", l_hrtime },
  { "pid", l_pid },
  { "publish_options", l_publish_options },
  { NULL, NULL }
};
