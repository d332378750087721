-- msda.lua: multi-scale deformable attention, the core op of Deformable DETR's MSDeformAttn.
--
--   out = fa.msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts)
--   gV, gLoc, gA = fa.msda_backward(gradOut, value, spatial_shapes, level_start_index,
--                                   sampling_locations, attention_weights, opts)
--
-- value (N, S, M, D); spatial_shapes (L, 2) as (H, W): an int64/int32 tensor on any device or a Lua table
-- {{H, W}, ...}; level_start_index (L) likewise, or nil (then it is computed from spatial_shapes);
-- sampling_locations (N, Lq, M, L, P, 2) normalised to [0, 1], x first; attention_weights (N, Lq, M, L, P).
-- out (N, Lq, M*D). Bilinear sampling at (x*W - 0.5, y*H - 0.5) as F.grid_sample(align_corners=false).
-- dtypes: float32/float64 on the CPU; float32/bfloat16/float16 values on CUDA (locations and weights are
-- then float32; otherwise they have value's dtype). Inputs that are not contiguous are copied to
-- contiguous tensors first (the C entry points require contiguous tensors).
--
-- opts (all optional):
--   padding = 'zeros' | 'border'   (default 'zeros', as Deformable DETR)
--   align_corners = false | true
--   deterministic = false | true   backward without float atomics, bit-identical run to run (CUDA; the
--                                  CPU backward is deterministic always)
--   out = tensor                   write the forward's result into it (N, Lq, M*D), contiguous
--   grad_value, grad_sampling_locations, grad_attention_weights = tensor | false
--                                  backward: write into the given tensor, or skip (false; returns nil)
local ffi = require 'ffi'
local fa = require 'fastattn'
local C = fa.C

local PAD = { zeros = 0, border = 1 }

local function fail(fn, fmt, ...) error(fn .. ': ' .. string.format(fmt, ...), 3) end

local function tensor_arg(fn, name, x)
  if not fa.isTensor(x) then fail(fn, "argument '%s': expected a tensor, got %s", name, type(x)) end
  return x
end

-- spatial_shapes / level_start_index as CPU int64 tensors (the host reads them)
local function levels_arg(fn, shapes, lsi)
  if type(shapes) == 'table' and not fa.isTensor(shapes) then
    for i, hw in ipairs(shapes) do
      if type(hw) ~= 'table' or type(hw[1]) ~= 'number' or type(hw[2]) ~= 'number' then
        fail(fn, "argument 'spatial_shapes': expected {{H, W}, ...} or an (L, 2) tensor, got a bad entry at level %d", i)
      end
    end
    shapes = #shapes > 0 and fa.tensor(shapes, 'int64') or fa.empty(0, 2, 'int64')
  end
  tensor_arg(fn, 'spatial_shapes', shapes)
  if shapes:dtype() ~= 'int64' and shapes:dtype() ~= 'int32' then
    fail(fn, "argument 'spatial_shapes': expected an int64 or int32 tensor, got %s", shapes:dtype())
  end
  shapes = shapes:to('int64', 'cpu'):contiguous()
  if lsi == nil then
    if shapes:dim() ~= 2 or shapes:size(2) ~= 2 then
      fail(fn, "argument 'spatial_shapes': expected shape (L, 2), got %s", fa._shape_str(shapes, 'x'))
    end
    local L = shapes:size(1)
    lsi = fa.empty(L, 'int64')
    local ps, pl, acc = ffi.cast('int64_t*', shapes.desc.data), ffi.cast('int64_t*', lsi.desc.data), 0LL
    for l = 0, L - 1 do
      pl[l] = acc
      acc = acc + ps[2 * l] * ps[2 * l + 1]
    end
  else
    if type(lsi) == 'table' and not fa.isTensor(lsi) then lsi = fa.tensor(lsi, 'int64') end
    tensor_arg(fn, 'level_start_index', lsi)
    if lsi:dtype() ~= 'int64' and lsi:dtype() ~= 'int32' then
      fail(fn, "argument 'level_start_index': expected an int64 or int32 tensor, got %s", lsi:dtype())
    end
    lsi = lsi:to('int64', 'cpu'):contiguous()
  end
  return shapes, lsi
end

local function opts_arg(fn, opts)
  if opts ~= nil and type(opts) ~= 'table' then fail(fn, "argument 'opts': expected a table or nil, got %s", type(opts)) end
  opts = opts or {}
  local pad = PAD[opts.padding or 'zeros']
  if not pad then fail(fn, "argument 'opts': expected padding 'zeros' or 'border', got %s", tostring(opts.padding)) end
  local o = ffi.new('fa_msda_opts')
  o.padding = pad
  o.align_corners = opts.align_corners and 1 or 0
  o.deterministic = opts.deterministic and 1 or 0
  return o, opts
end

-- C messages start with the C function's name; the Lua user called fa.msda / fa.msda_backward
local function check(rc, cname, fn)
  if rc ~= 0 then
    local msg = ffi.string(C.fa_last_error())
    error((msg:gsub('^' .. cname, fn)), 3)
  end
end

local function msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, opts)
  local fn = 'fa.msda'
  tensor_arg(fn, 'value', value)
  tensor_arg(fn, 'sampling_locations', sampling_locations)
  tensor_arg(fn, 'attention_weights', attention_weights)
  local shapes, lsi = levels_arg(fn, spatial_shapes, level_start_index)
  local o, t = opts_arg(fn, opts)
  value, sampling_locations, attention_weights = value:contiguous(), sampling_locations:contiguous(),
      attention_weights:contiguous()
  local out = t.out
  if out ~= nil then
    tensor_arg(fn, 'opts.out', out)
  else
    if value:dim() ~= 4 then
      fail(fn, "argument 'value': expected a 4-D tensor (N, S, M, D), got shape %s", fa._shape_str(value, 'x'))
    end
    if sampling_locations:dim() < 2 then
      fail(fn, "argument 'sampling_locations': expected a 6-D tensor (N, Lq, M, L, P, 2), got shape %s",
           fa._shape_str(sampling_locations, 'x'))
    end
    out = fa.empty(value:size(1), sampling_locations:size(2), value:size(3) * value:size(4),
                   { dtype = value:dtype(), device = value:device() })
  end
  check(C.fa_msda_forward(out.desc, value.desc, shapes.desc, lsi.desc, sampling_locations.desc,
                          attention_weights.desc, o), 'fa_msda_forward', fn)
  return out
end

local function grad_buffer(fn, t, key, like)
  local g = t[key]
  if g == false then return nil end
  if g ~= nil then return tensor_arg(fn, 'opts.' .. key, g) end
  return fa.empty_like(like)
end

local function msda_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, opts)
  local fn = 'fa.msda_backward'
  tensor_arg(fn, 'grad_out', grad_out)
  tensor_arg(fn, 'value', value)
  tensor_arg(fn, 'sampling_locations', sampling_locations)
  tensor_arg(fn, 'attention_weights', attention_weights)
  local shapes, lsi = levels_arg(fn, spatial_shapes, level_start_index)
  local o, t = opts_arg(fn, opts)
  grad_out, value = grad_out:contiguous(), value:contiguous()
  sampling_locations, attention_weights = sampling_locations:contiguous(), attention_weights:contiguous()
  local gv = grad_buffer(fn, t, 'grad_value', value)
  local gl = grad_buffer(fn, t, 'grad_sampling_locations', sampling_locations)
  local ga = grad_buffer(fn, t, 'grad_attention_weights', attention_weights)
  check(C.fa_msda_backward(gv and gv.desc or nil, gl and gl.desc or nil, ga and ga.desc or nil, grad_out.desc,
                           value.desc, shapes.desc, lsi.desc, sampling_locations.desc, attention_weights.desc, o),
        'fa_msda_backward', fn)
  return gv, gl, ga
end

rawset(fa, 'msda', msda)
rawset(fa, 'msda_backward', msda_backward)
return { msda = msda, msda_backward = msda_backward }
