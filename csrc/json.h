/*
** json.h: Lua values to JSON text and back, with cJSON.
**
** Only the binding files (l*.c) and json.c include this header: its
** functions take a lua_State, so json.c is the one file besides them that
** sees Lua headers (its whole job is Lua values; STYLE.md names it so).
*/
#ifndef BUZZ_JSON_H
#define BUZZ_JSON_H

#include "compat.h"
#include "buzz.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

/*
** Encodes the value at idx as JSON text. On success pushes the text as a
** string and returns 0. On failure pushes a message (without the code
** name) and returns BUZZ_EINVAL (the value cannot be held by JSON; the
** message names the path from root, such as 'payload.items[3].cb: ...'),
** BUZZ_ETOOBIG ('payload is N bytes as JSON, above the limit of M bytes';
** max 0 = no limit) or BUZZ_ENOMEM (malloc failed inside cJSON). Either
** way exactly one value is pushed. Ignores metatables and calls no Lua
** code. Raises only when Lua runs out of memory; the malloc'd memory it
** holds meanwhile is owned by a userdata, so nothing leaks.
*/
int buzz__json_encode(lua_State *L, int idx, const char *root, size_t max);

/*
** The same, in canonical form: the members of every object in bytewise
** key order, no limit. Equal Lua values (whatever their tables' insertion
** history, and on Lua 5.4 or LuaJIT alike) give equal text: what a state's
** version hash is taken over (lua/buzz/projection.lua).
*/
int buzz__json_canonical(lua_State *L, int idx, const char *root);

/*
** Decodes the len bytes at s (need not end with NUL). On success pushes
** the value and returns 0: nil for a top-level null, the null sentinel
** for one in an array; null members of objects are left out. On failure
** pushes a message ('invalid JSON at byte offset N near ...: why') and
** returns BUZZ_EINVAL. Thread-safe as far as cJSON is (it does not read
** cJSON_GetErrorPtr()); raises only when Lua runs out of memory.
*/
int buzz__json_decode(lua_State *L, const char *s, size_t len);

/*
** Sets json_encode(value [, max]), json_decode(text) and null (the light
** userdata NULL) in the table on top (the module). Failures return nil,
** "ECODE: message", "ECODE".
*/
void buzz__json_register(lua_State *L);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
