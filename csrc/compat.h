/*
** compat.h: the few Lua C API differences between 5.1/LuaJIT and 5.4 that
** lbuzz.c and json.c need. Included only by them. Never defines a lua_* or
** luaL_* name that LuaJIT 2.1 already provides (luaL_setfuncs,
** luaL_testudata, luaL_traceback are there); the rest get buzz_* names.
*/
#ifndef BUZZ_COMPAT_H
#define BUZZ_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

/* What buzz supports: Lua 5.4 and LuaJIT 2.1 (whose API is 5.1's). Other
** headers stop the build here, saying so (rockspec/ can only ask for
** "lua >= 5.1, < 5.5": LuaRocks calls LuaJIT 5.1). */
#if LUA_VERSION_NUM == 501
#if defined(__has_include)
#if !__has_include(<luajit.h>)
#error "buzz builds for Lua 5.4 and LuaJIT 2.1 only: these are PUC Lua 5.1's headers"
#endif
#endif
#elif LUA_VERSION_NUM != 504
#error "buzz builds for Lua 5.4 and LuaJIT 2.1 only: these are Lua 5.2's or 5.3's headers"
#endif

/* Resumes co with nargs arguments from its stack; returns the status. */
#if LUA_VERSION_NUM >= 504
static inline int buzz_resume(lua_State *co, lua_State *from, int nargs) {
  int nres;
  return lua_resume(co, from, nargs, &nres);
}
#elif LUA_VERSION_NUM >= 502
#define buzz_resume(co, from, nargs)  lua_resume((co), (from), (nargs))
#else
#define buzz_resume(co, from, nargs)  lua_resume((co), (nargs))
#endif

/*
** As buzz_resume, and sets *nres to the number of values co yielded or
** returned, on top of its stack (5.4 says; before it, they are the whole
** stack).
*/
#if LUA_VERSION_NUM >= 504
static inline int buzz_resume_n(lua_State *co, lua_State *from, int nargs,
                                int *nres) {
  return lua_resume(co, from, nargs, nres);
}
#else
/*
** OpenResty's LuaJIT keeps in each thread the nginx request it serves
** (lua_getexdata; the lua module's ngx.* read it), and a new thread
** inherits its creator's. The bus's threads serve many requests and
** timers, so each resume hands co the resumer's: ngx.sleep or a cosocket
** in a handler then belongs to the current request or timer, never to a
** finished one (whose freed memory would crash the worker).
*/
#include <luajit.h>
static inline int buzz_resume_n(lua_State *co, lua_State *from, int nargs,
                                int *nres) {
  int rc;
#ifdef OPENRESTY_LUAJIT
  lua_setexdata(co, lua_getexdata(from));
#endif
  (void)from;                          /* 5.1 has no from */
  rc = buzz_resume(co, from, nargs);
  *nres = lua_gettop(co);
  return rc;
}
#endif

/* Closes a thread's pending to-be-closed variables before it is dropped. */
#if LUA_VERSION_NUM >= 504
#define buzz_resetthread(co)  ((void)lua_resetthread(co))
#else
#define buzz_resetthread(co)  ((void)(co))
#endif

#if LUA_VERSION_NUM == 501
#define buzz_newud(L, size)  lua_newuserdata((L), (size))
#define buzz_getuv(L, idx)   lua_getfenv((L), (idx))
#define buzz_setuv(L, idx)   lua_setfenv((L), (idx))
#define buzz_absindex(L, i) \
  ((i) > 0 || (i) <= LUA_REGISTRYINDEX ? (i) : lua_gettop(L) + (i) + 1)
#elif LUA_VERSION_NUM < 504
#define buzz_newud(L, size)  lua_newuserdata((L), (size))
#define buzz_getuv(L, idx)   lua_getuservalue((L), (idx))
#define buzz_setuv(L, idx)   lua_setuservalue((L), (idx))
#define buzz_absindex(L, i)  lua_absindex((L), (i))
#else
#define buzz_newud(L, size)  lua_newuserdatauv((L), (size), 1)
#define buzz_getuv(L, idx)   lua_getiuservalue((L), (idx), 1)
#define buzz_setuv(L, idx)   lua_setiuservalue((L), (idx), 1)
#define buzz_absindex(L, i)  lua_absindex((L), (i))
#endif


/*
** Length and order of values that are both numbers or both strings (never
** a metamethod). Before 5.2 there is no lua_compare: numbers compare in
** C, so that NaN is unordered as in Lua; strings with lua_lessthan.
*/
#if LUA_VERSION_NUM >= 502
#define buzz_rawlen(L, i)    lua_rawlen((L), (i))
#define buzz_lt(L, a, b)     lua_compare((L), (a), (b), LUA_OPLT)
#define buzz_le(L, a, b)     lua_compare((L), (a), (b), LUA_OPLE)
#else
#define buzz_rawlen(L, i)    lua_objlen((L), (i))
static inline int buzz_lt(lua_State *L, int a, int b) {
  if (lua_type(L, a) == LUA_TNUMBER)
    return lua_tonumber(L, a) < lua_tonumber(L, b);
  return lua_lessthan(L, a, b);
}
static inline int buzz_le(lua_State *L, int a, int b) {
  if (lua_type(L, a) == LUA_TNUMBER)
    return lua_tonumber(L, a) <= lua_tonumber(L, b);
  return !lua_lessthan(L, b, a);
}
#endif

#endif
