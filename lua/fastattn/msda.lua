-- msda.lua: multi-scale deformable attention, the core op of Deformable DETR's MSDeformAttn.
--
--   out = fa.msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts)
--   gV, gLoc, gA = fa.msda_backward(grad_out, value, spatial_shapes, level_start_index,
--                                   sampling_locations, attention_weights, opts)
--
-- value (N, S, M, D); spatial_shapes (L, 2) as (H, W): an int64/int32 tensor on any device or a Lua table
-- {{H, W}, ...}; level_start_index (L) likewise, or nil (the running sum of H*W); sampling_locations
-- (N, Lq, M, L, P, 2) normalised to [0, 1], x first; attention_weights (N, Lq, M, L, P). out (N, Lq, M*D).
-- Bilinear sampling at (x*W - 0.5, y*H - 0.5) as F.grid_sample(align_corners=false). dtypes: float32/float64
-- on the CPU; float32/bfloat16/float16 values on CUDA with float32 locations and weights. Any strides.
--
-- opts (all optional):
--   padding = 'zeros' | 'border'   (default 'zeros', as Deformable DETR)
--   align_corners = false | true
--   deterministic = false | true   backward without float atomics, bit-identical run to run (CUDA; the
--                                  CPU backward is deterministic always)
--   order = 'auto' | 'query' | 'head', merge = nil | true | false
--                                  GPU kernel variants, for tests and benchmarks (fa_msda_opts in c/fastattn.h)
--   out = tensor                   fa.msda: write the result into it (N, Lq, M*D), contiguous
--   grad_value, grad_sampling_locations, grad_attention_weights = tensor | false
--                                  fa.msda_backward: write into the given tensor, or skip it (false; returns nil)
--
-- Everything is validated once, by the C entry (c/msda.c); this wrapper converts Lua values and allocates.
local ffi = require 'ffi'
local fa = require 'fastattn'
local E = require 'fastattn.errors'
local C = fa.C

local PADDING = { zeros = C.FA_PAD_ZEROS, border = C.FA_PAD_BORDER }
local ORDER = { auto = C.FA_MSDA_ORDER_AUTO, query = C.FA_MSDA_ORDER_QUERY, head = C.FA_MSDA_ORDER_HEAD }
local COMMON = { padding = true, align_corners = true, deterministic = true, order = true, merge = true }
local FWD_OPTS, BWD_OPTS = { out = true }, { grad_value = true, grad_sampling_locations = true,
                                             grad_attention_weights = true }
for k in pairs(COMMON) do FWD_OPTS[k], BWD_OPTS[k] = true, true end

-- a table of integers (a list, or a list of {H, W} pairs) as an int64 tensor; a tensor moved to the CPU
local function levels(fn, name, x, pairs_of)
  -- (name: the argument as the caller knows it)
  if x == nil and not pairs_of then return nil end
  if type(x) == 'table' and not fa.isTensor(x) then
    local flat = {}
    for i = 1, #x do
      local e = pairs_of and x[i] or { x[i] }
      if type(e) ~= 'table' or #e ~= (pairs_of and 2 or 1) then
        E.arg(fn, name, pairs_of and '{{H, W}, ...} or an (L, 2) tensor' or 'a list of integers or an (L) tensor',
              string.format('%s at index %d', E.describe(x[i]), i))
      end
      for j = 1, #e do flat[#flat + 1] = E.integer(fn, string.format('%s[%d]', name, i), e[j]) end
    end
    local t = fa.empty(pairs_of and { #x, 2 } or { #x }, 'int64')
    if #flat > 0 then ffi.copy(t.desc.data, ffi.new('int64_t[?]', #flat, flat), 8 * #flat) end
    return t
  end
  E.tensor(fn, name, x)
  return x:isCuda() and x:cpu() or x
end

local function c_opts(fn, opts, known, N)
  local o = E.opts(fn, N('opts'), opts, known)
  local c = ffi.new('fa_msda_opts')
  c.padding = PADDING[E.string(fn, N('opts') .. '.padding', o.padding, { 'zeros', 'border' }, true) or 'zeros']
  c.align_corners = E.boolean(fn, N('opts') .. '.align_corners', o.align_corners, true) and 1 or 0
  c.deterministic = E.boolean(fn, N('opts') .. '.deterministic', o.deterministic, true) and 1 or 0
  c.order = ORDER[E.string(fn, N('opts') .. '.order', o.order, { 'auto', 'query', 'head' }, true) or 'auto']
  local merge = E.boolean(fn, N('opts') .. '.merge', o.merge, true)
  c.merge = merge == nil and C.FA_MSDA_AUTO or merge and C.FA_MSDA_ON or C.FA_MSDA_OFF
  return c, o
end

-- the argument names a caller uses (rename: {value = 'input[3]', ...} or nil), for Lua checks and C messages
local function namer(rename)
  if rename == nil then return function(n) return n end end
  return function(n) return rename[n] or n end
end

local function msda_impl(fn, rename, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts)
  local N = namer(rename)
  E.tensor(fn, N('value'), value)
  E.tensor(fn, N('sampling_locations'), sampling_locations)
  E.tensor(fn, N('attention_weights'), attention_weights)
  local shapes = levels(fn, N('spatial_shapes'), spatial_shapes, true)
  local lsi = levels(fn, N('level_start_index'), level_start_index, false)
  local o, t = c_opts(fn, opts, FWD_OPTS, N)
  local out = E.tensor(fn, N('out'), t.out, true)
  if out == nil then -- (N, Lq, M*D); for inputs of the wrong rank C reports them before it looks at out
    local ok = value:dim() == 4 and sampling_locations:dim() == 6
    out = fa.empty(ok and { value:size(1), sampling_locations:size(2), value:size(3) * value:size(4) } or { 0 },
                   { dtype = value:dtype(), device = value:device() })
  end
  E.check(C.fa_msda_forward(out.desc, value.desc, shapes.desc, lsi and lsi.desc, sampling_locations.desc,
                            attention_weights.desc, o), fn, rename)
  return out
end

local function msda_backward_impl(fn, rename, grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, opts)
  local N = namer(rename)
  E.tensor(fn, N('grad_out'), grad_out)
  E.tensor(fn, N('value'), value)
  E.tensor(fn, N('sampling_locations'), sampling_locations)
  E.tensor(fn, N('attention_weights'), attention_weights)
  local shapes = levels(fn, N('spatial_shapes'), spatial_shapes, true)
  local lsi = levels(fn, N('level_start_index'), level_start_index, false)
  local o, t = c_opts(fn, opts, BWD_OPTS, N)
  local gv = E.buffer(fn, N('grad_value'), t.grad_value, fa.empty_like, value)
  local gl = E.buffer(fn, N('grad_sampling_locations'), t.grad_sampling_locations, fa.empty_like, sampling_locations)
  local ga = E.buffer(fn, N('grad_attention_weights'), t.grad_attention_weights, fa.empty_like, attention_weights)
  E.check(C.fa_msda_backward(gv and gv.desc, gl and gl.desc, ga and ga.desc, grad_out.desc, value.desc, shapes.desc,
                             lsi and lsi.desc, sampling_locations.desc, attention_weights.desc, o), fn, rename)
  return gv, gl, ga
end

local function msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts)
  return msda_impl('fa.msda', nil, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts)
end
local function msda_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, opts)
  return msda_backward_impl('fa.msda_backward', nil, grad_out, value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights, opts)
end

msda, msda_backward = E.strict('fa.msda', msda), E.strict('fa.msda_backward', msda_backward)
rawset(fa, 'msda', msda)
rawset(fa, 'msda_backward', msda_backward)
-- _msda(fn, rename, ...) and _msda_backward(fn, rename, ...): the same, with messages in a caller's words (fn its
-- name, rename {value = 'input[3]', ...} its argument names), for nn.MSDeformAttn
return { msda = msda, msda_backward = msda_backward, _msda = msda_impl, _msda_backward = msda_backward_impl }
