-- fastattn: `local fa = require 'fastattn'`
local lib = require 'fastattn.ffi'
local ffi = require 'ffi'

local fa = {}
fa.C = lib
fa.errors = require 'fastattn.errors' -- the one error helper (messages at the caller's line)
fa.version = ffi.string(lib.fa_version())

local function merge(m)
  for k, v in pairs(m) do
    if fa[k] == nil then fa[k] = v end
  end
end
merge(require 'fastattn.tensor')
merge(require 'fastattn.math')
merge(require 'fastattn.io')

-- x.view(2, 3) for x:view(2, 3) (a newcomer's slip) gets a message instead of "attempt to index local 'self'":
-- every Tensor method checks its self, and an argument past the ones it declares is an error (x:log(a) is not
-- log(a), x:clone('float64') no conversion). Once per method (a reloaded module brings new functions; wrappers stay).
do
  local registry = debug.getregistry()
  local wrappers = registry.fastattn_method_wrappers or setmetatable({}, { __mode = 'k' })
  registry.fastattn_method_wrappers = wrappers
  local Tensor, isTensor, E = fa.Tensor, fa.isTensor, fa.errors
  for name, f in pairs(Tensor) do
    if type(f) == 'function' and not wrappers[f] and name ~= '__tostring' then
      local fn, hint = 'Tensor:' .. name, 'a tensor (call it as x:' .. name .. '(...), with a colon)'
      local np = E.nparams(f) -- nil: vararg, checks its own arguments
      local w
      if np then
        local nx = np - 1
        w = function(self, ...)
          if not isTensor(self) then E.argv(fn, 'self', hint, self) end
          if select('#', ...) > nx then E.no_extra(fn, np, 1, self, ...) end
          return f(self, ...)
        end
      else
        w = function(self, ...)
          if not isTensor(self) then E.argv(fn, 'self', hint, self) end
          return f(self, ...)
        end
      end
      wrappers[w] = true
      Tensor[name] = w
    end
  end
end

-- monotonic wall-clock seconds (for progress lines and benchmarks; os.clock counts CPU time of all threads)
pcall(ffi.cdef, 'typedef struct { long tv_sec, tv_nsec; } fa_timespec; int clock_gettime(int, fa_timespec *);')
local ts = ffi.new('fa_timespec')
function fa.clock()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

-- CPU threads (OpenMP); 1..65536
function fa.setNumThreads(n) lib.fa_set_num_threads(fa.errors.integer('fa.setNumThreads', 'n', n, 1, 65536)) end
function fa.getNumThreads() return tonumber(lib.fa_get_num_threads()) end

-- every fa.* function rejects arguments past the ones it declares (fa.errors' E.strict); the lazily loaded
-- modules below get the same as they load
fa.errors.strictModule('fa', fa)
local STRICT = { util = 'fa.util', cuda = 'fa.cuda', optim = 'fa.optim', F = 'fa.F' }

-- optional parts load lazily so that a missing one names itself in the error
setmetatable(fa, {
  __index = function(t, k)
    local mods = { nn = 'fastattn.nn', optim = 'fastattn.optim', cuda = 'fastattn.cuda', F = 'fastattn.functional',
                   grid_sample = 'fastattn.functional', msda = 'fastattn.msda', msda_backward = 'fastattn.msda',
                   attention = 'fastattn.attention', attention_backward = 'fastattn.attention',
                   triangle_attention = 'fastattn.attention', triangle_attention_backward = 'fastattn.attention',
                   cpb = 'fastattn.cpb', cpb_backward = 'fastattn.cpb',
                   deform_sdpa = 'fastattn.deform_sdpa', deform_sdpa_backward = 'fastattn.deform_sdpa',
                   util = 'fastattn.util' }
    if mods[k] then
      local m = require(mods[k])
      -- a module that sets fa[k] itself while loading (functional.lua sets fa.grid_sample) keeps its value
      if rawget(t, k) == nil then rawset(t, k, m) end
      if STRICT[k] and type(m) == 'table' then fa.errors.strictModule(STRICT[k], m) end
      -- functions a module sets on fa while loading (fa.grid_sample, fa.msda)
      for name in pairs(mods) do
        local f = rawget(t, name)
        if type(f) == 'function' then rawset(t, name, fa.errors.strict('fa.' .. name, f)) end
      end
      return rawget(t, k)
    end
  end,
})
package.loaded.fastattn = fa
return fa
