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

return E
