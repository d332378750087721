-- ffi.lua: loads libfastattn and declares its API from c/fastattn.h (the one source of truth).
local ffi = require 'ffi'

-- once per Lua state: a second load (package.loaded cleared) must not cdef the header twice
local registry = debug.getregistry()
if registry.fastattn_lib then return registry.fastattn_lib end

local here = (debug.getinfo(1, 'S').source:match('^@(.*)/[^/]*$')) or '.'

local function readfile(path)
  local f = io.open(path, 'r')
  if not f then return nil end
  local s = f:read('*a')
  f:close()
  return s
end

-- the header: next to this module once installed, c/fastattn.h in a checkout
local header_tried = { here .. '/fastattn.h', here .. '/../../c/fastattn.h' }
local header
for _, p in ipairs(header_tried) do
  header = readfile(p)
  if header then break end
end
if not header then
  error('fastattn: cannot find fastattn.h; tried:\n  ' .. table.concat(header_tried, '\n  '), 0)
end
-- strip preprocessor lines and the C++ guards (as Torch's THNN did)
header = header:gsub('#ifdef __cplusplus.-#endif', '')
header = header:gsub('\n%s*#[^\n]*', '\n'):gsub('^%s*#[^\n]*', '')
ffi.cdef(header)
ffi.cdef [[
typedef struct fa_Tensor { fa_tensor desc; fa_storage *storage; } fa_Tensor;
]]

local tried = {}
local lib
local function try(path)
  tried[#tried + 1] = path
  local ok, l = pcall(ffi.load, path)
  if ok then
    lib = l
    -- Pin the library: at lua_close LuaJIT may unload it before the finalizers of live tensors run,
    -- and those finalizers call into it. A second dlopen reference keeps it mapped until exit.
    pcall(function()
      ffi.cdef 'void *dlopen(const char *filename, int flags);'
      ffi.C.dlopen(path:find('/') and path or ('lib' .. path .. '.so'), 2 + 0x100) -- RTLD_NOW | RTLD_GLOBAL
    end)
  end
  return ok
end
local env = os.getenv('FASTATTN_LIB')
if not (env and try(env)) then
  if not (try(here .. '/../../build/libfastattn.so') or try(here .. '/libfastattn.so')
          or try(here .. '/../../../../lib/libfastattn.so')) then
    try('fastattn')
  end
end
if not lib then
  error('fastattn: cannot load libfastattn.so; tried (FASTATTN_LIB, next to the module, the system):\n  '
        .. table.concat(tried, '\n  ')
        .. '\nBuild it with `make` in the fastattn checkout, or set FASTATTN_LIB to its path.', 0)
end

registry.fastattn_lib = lib
return lib
