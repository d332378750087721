-- errors.lua: the one way fastattn reports bad input (DESIGN §3). Every message reads
--   fa.F.linear: argument 'input': expected a float32 tensor, got float64
-- and is raised at the user's line: the first stack frame outside lua/fastattn/, however deep inside the
-- library the check ran. The C library leaves "fa_<c_name>: argument '<c arg>': ..." in fa_last_error();
-- E.check swaps the C function name for the Lua one (and C argument names for the Lua ones, where they differ).
--
--   E.raise(msg)                        raise msg at the user's line
--   E.fail(fn, fmt, ...)                "fn: <formatted>"
--   E.arg(fn, name, expected, got)      "fn: argument 'name': expected <expected>, got <got>"  (got: any value)
--   E.check(rc, fn, rename)             rc ~= 0 -> the C message, renamed; returns nothing
--   E.describe(v)                       how a value appears after "got"
-- Argument checkers (return the value, raise otherwise):
--   E.tensor(fn, name, x, optional)     E.number(fn, name, v, optional)      E.integer(fn, name, v, lo, hi, optional)
--   E.boolean(fn, name, v, optional)    E.string(fn, name, v, choices, optional)
--   E.opts(fn, name, t, known)          a table or nil whose keys are all in `known` (a set); returns t or {}
local ffi = require 'ffi'

local registry = debug.getregistry()
if registry.fastattn_errors then return registry.fastattn_errors end

local E = {}
registry.fastattn_errors = E

-- the library's directory, from this file's own chunk name ("@/path/lua/fastattn/errors.lua")
local function norm(src) return (src:gsub('^@%./', '@')) end
local libdir = norm(debug.getinfo(1, 'S').source):match('^(@.*/)[^/]*$') or '@lua/fastattn/'

local function in_library(info)
  if info.what == 'C' then return true end -- C frames (pcall, gsub callbacks) are transparent
  local src = norm(info.source)
  return src:sub(1, #libdir) == libdir
end

-- error level (relative to the caller of E.raise's caller chain) of the first frame outside the library
local function user_level()
  local lvl = 3 -- 1 = user_level, 2 = E.raise, 3 = whoever called E.raise
  while true do
    local info = debug.getinfo(lvl, 'S')
    if not info then return 0 end -- the whole stack is the library: no position
    if not in_library(info) then return lvl - 1 end
    lvl = lvl + 1
  end
end

function E.raise(msg)
  error(msg, user_level())
end

function E.fail(fn, fmt, ...)
  E.raise(fn .. ': ' .. (select('#', ...) > 0 and string.format(fmt, ...) or fmt))
end

E.isTensor = function() return false end -- tensor.lua installs the real test

-- "got" text: tensors by dtype and size, strings quoted, numbers as written (nan, inf included)
function E.describe(v)
  local t = type(v)
  if t == 'nil' then return 'nil' end
  if t == 'string' then return string.format('%q', #v > 40 and v:sub(1, 37) .. '...' or v) end
  if t == 'number' then
    if v ~= v then return 'nan' end
    if v == math.huge then return 'inf' elseif v == -math.huge then return '-inf' end
    if v == math.floor(v) and math.abs(v) < 2^53 then return string.format('%d', v) end
    for _, f in ipairs({ '%.15g', '%.16g' }) do -- the shortest form that reads back as v
      local str = string.format(f, v)
      if tonumber(str) == v then return str end
    end
    return string.format('%.17g', v)
  end
  if t == 'boolean' then return tostring(v) end
  if E.isTensor(v) then
    local s = {}
    for i = 0, v.desc.ndim - 1 do s[#s + 1] = tostring(tonumber(v.desc.shape[i])) end
    local dt = v:dtype()
    return string.format('%s %s tensor of size %s%s', dt:match('^[aeiou]') and 'an' or 'a', dt, v.desc.ndim == 0 and '[]' or table.concat(s, 'x'),
                         v.desc.device >= 0 and (' on cuda:' .. v.desc.device) or '')
  end
  if t == 'cdata' then return 'cdata<' .. tostring(ffi.typeof(v)):match('^ctype<(.*)>$') .. '>' end
  return 'a ' .. t
end

function E.arg(fn, name, expected, got)
  E.raise(string.format("%s: argument '%s': expected %s, got %s", fn, name, expected,
                        type(got) == 'string' and got or E.describe(got)))
end
-- as E.arg, but `got` is shown as a value even when it is a string
function E.argv(fn, name, expected, v)
  E.raise(string.format("%s: argument '%s': expected %s, got %s", fn, name, expected, E.describe(v)))
end

-- the failing path of E.check, kept out of it: a closure in E.check would stop LuaJIT compiling its callers
local function check_failed(fn, rename)
  local msg = ffi.string(require('fastattn.ffi').fa_last_error())
  msg = msg:gsub('^fa_[%w_]+: ', '', 1)
  if rename then
    local function ren(a) return rename[a] or a end
    msg = msg:gsub("argument '([%w_]+)'", function(a) return "argument '" .. ren(a) .. "'" end)
    msg = msg:gsub("%(as '([%w_]+)'%)", function(a) return "(as '" .. ren(a) .. "')" end)
  end
  E.raise(fn .. ': ' .. msg)
end

function E.check(rc, fn, rename)
  if rc ~= 0 then check_failed(fn, rename) end
end

---------------------------------------------------------------------------- argument checkers
function E.tensor(fn, name, x, optional)
  if x == nil and optional then return nil end
  if not E.isTensor(x) then E.argv(fn, name, optional and 'a tensor or nil' or 'a tensor', x) end
  return x
end

function E.number(fn, name, v, optional)
  if v == nil and optional then return nil end
  if type(v) ~= 'number' or v ~= v then E.argv(fn, name, 'a number', v) end
  return v
end

-- an integer (no fraction, finite) in [lo, hi] (either bound may be nil)
function E.integer(fn, name, v, lo, hi, optional)
  if v == nil and optional then return nil end
  local ok = type(v) == 'number' and v == math.floor(v) and v > -2^53 and v < 2^53
             and (lo == nil or v >= lo) and (hi == nil or v <= hi)
  if not ok then
    local range = (lo and hi) and string.format(' in %d..%d', lo, hi) or lo and string.format(' >= %d', lo)
                  or hi and string.format(' <= %d', hi) or ''
    E.argv(fn, name, 'an integer' .. range, v)
  end
  return v
end

function E.boolean(fn, name, v, optional)
  if v == nil and optional then return nil end
  if type(v) ~= 'boolean' then E.argv(fn, name, 'true or false', v) end
  return v
end

-- a string; with `choices` (a list) one of them
function E.string(fn, name, v, choices, optional)
  if v == nil and optional then return nil end
  local ok = type(v) == 'string'
  if ok and choices then
    ok = false
    for _, c in ipairs(choices) do if c == v then ok = true end end
  end
  if not ok then
    local exp = 'a string'
    if choices then
      local q = {}
      for i, c in ipairs(choices) do q[i] = "'" .. c .. "'" end
      exp = #q == 1 and q[1] or table.concat(q, ', ', 1, #q - 1) .. ' or ' .. q[#q]
    end
    E.argv(fn, name, exp, v)
  end
  return v
end

-- an options table (or nil) with only known keys; `known` is a set {key = true}
function E.opts(fn, name, t, known)
  if t == nil then return {} end
  if type(t) ~= 'table' or E.isTensor(t) then E.argv(fn, name, 'a table of options or nil', t) end
  if known then
    for k in pairs(t) do
      if not known[k] then
        local names = {}
        for n in pairs(known) do names[#names + 1] = tostring(n) end
        table.sort(names)
        E.raise(string.format("%s: argument '%s': unknown option %s (known: %s)", fn, name, E.describe(k),
                              table.concat(names, ', ')))
      end
    end
  end
  return t
end


---------------------------------------------------------------------------- fixcore: extra arguments
-- An argument past the ones a function declares is an error, not silently dropped (x:log(a), x:sum(1, 2) and
-- x:clone('float64') would otherwise mean something else than the caller thinks).
--   E.nparams(f)                     f's declared parameter count; nil for a vararg or C function
--   E.no_extra(fn, n, skip, ...)     raises for the first non-nil argument past the n-th ("skip" leading
--                                    arguments, a method's self, are not counted in the message)
--   E.strict(fn, f, skip)            f wrapped to call no_extra first; f itself when it is vararg (it checks its own)
--   E.strictModule(prefix, t)        every function field of t not starting with '_' made strict in place,
--                                    named prefix .. '.' .. key
function E.nparams(f)
  local info = debug.getinfo(f, 'Su')
  if info.what ~= 'Lua' or info.isvararg then return nil end
  return info.nparams
end

function E.no_extra(fn, n, skip, ...)
  for i = n + 1, select('#', ...) do
    local v = select(i, ...)
    if v ~= nil then
      local k = n - skip
      -- a call as the last argument passes all its results: fa.maxAbsDiff(a, F.layer_norm(x, 3)) passes four
      E.raise(string.format('%s: argument #%d: expected nothing (%s takes %s; a call as the last argument passes ' ..
                            'all its results, (f(...)) passes one), got %s', fn, i - skip, fn,
                            k == 0 and 'no arguments' or k == 1 and 'at most 1 argument' or ('at most ' .. k .. ' arguments'),
                            E.describe(v)))
    end
  end
end

local strict_wrappers = setmetatable({}, { __mode = 'k' })
function E.strict(fn, f, skip)
  if strict_wrappers[f] then return f end
  local n = E.nparams(f)
  if not n then return f end
  skip = skip or 0
  local w = function(...)
    if select('#', ...) > n then E.no_extra(fn, n, skip, ...) end
    return f(...)
  end
  strict_wrappers[w] = true
  return w
end
E._strict_wrappers = strict_wrappers

function E.strictModule(prefix, t)
  for k, f in pairs(t) do
    if type(f) == 'function' and type(k) == 'string' and k:sub(1, 1) ~= '_' then
      t[k] = E.strict(prefix .. '.' .. k, f)
    end
  end
  return t
end

-- The buffer convention of the core ops (DESIGN §3): opts[key] = false skips that result (nil), a tensor is
-- written into (checked), nil gets make(...), a new one.
function E.buffer(fn, name, g, make, ...)
  if g == false then return nil end
  if g ~= nil then return E.tensor(fn, name, g) end
  return make(...)
end

return E
