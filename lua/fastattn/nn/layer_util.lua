-- fastattn.nn.layer_util: what the attention layers (nn/deformable_attention2d.lua, nn/deformable_sdpa.lua,
-- nn/msdeformattn.lua, nn/triangle_attention.lua) share inside their forward and backward.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local E = require 'fastattn.errors'

local U = {}
local DT = fa.dtypes

-- self[key]: a tensor of shape in dtype on device, kept between calls (nn._buffer)
function U.buffer(self, key, shape, dtype, device)
  self[key] = nn._buffer(self[key], shape, dtype, device)
  return self[key]
end

-- the dtype of the positions, coordinates and biases: float32 under a 16-bit module dtype
function U.posDtype(x)
  local dt = x.desc.dtype
  return (dt == DT.bfloat16 or dt == DT.float16) and DT.float32 or dt
end

-- a child module's part in the parent's backward: with acc its fused backward (which adds scale times its
-- parameter gradients), else its updateGradInput
function U.childBackward(acc, scale)
  return function(m, inp, g)
    if acc then return m:backward(inp, g, scale) end
    return m:updateGradInput(inp, g)
  end
end

-- self._size of the last forward ({B, H, W, ...}), which a backward of an input of B x H x W needs; an error
-- for function fn when there was none (self._oa, its attention output, unset) or it was of another size
function U.lastForward(self, fn, B, H, W)
  local sz = self._size
  if sz == nil or sz[1] ~= B or sz[2] ~= H or sz[3] ~= W or self._oa == nil then
    E.fail(fn, 'expected the input of the last forward (call forward first)')
  end
  return sz
end

return U
