-- norm.lua: nn.LayerNorm(normalized_shape, eps = 1e-5, elementwise_affine = true), as PyTorch's:
-- normalises over the trailing dims given by normalized_shape (a number or a table of sizes).
-- Also nn.LayerNorm{normalized_shape=, eps=, elementwise_affine=, bias=}. Parameters weight (ones) and
-- bias (zeros) of size normalized_shape.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local LayerNorm = nn.class('LayerNorm', nn.Module)

function LayerNorm:__init(normalized_shape, eps, elementwise_affine)
  nn.Module.__init(self)
  local bias = true
  if type(normalized_shape) == 'table' and normalized_shape.normalized_shape then
    local o = normalized_shape
    normalized_shape, eps, elementwise_affine, bias = o.normalized_shape, o.eps, o.elementwise_affine, o.bias ~= false
  end
  local ns = type(normalized_shape) == 'number' and { normalized_shape } or normalized_shape
  if type(ns) ~= 'table' or #ns == 0 then
    error('nn.LayerNorm: expected normalized_shape as a size or a table of sizes, got ' .. tostring(normalized_shape), 3)
  end
  local n = 1
  for i, s in ipairs(ns) do
    if type(s) ~= 'number' or s < 1 then
      error('nn.LayerNorm: normalized_shape[' .. i .. '] must be a positive integer, got ' .. tostring(s), 3)
    end
    n = n * s
  end
  self.normalized_shape = { unpack(ns) }
  self.normSize = n
  self.eps = eps or 1e-5
  self.elementwise_affine = elementwise_affine ~= false
  if self.elementwise_affine then
    self:registerParameter('weight', fa.ones(self.normalized_shape))
    if bias then self:registerParameter('bias', fa.zeros(self.normalized_shape)) end
  end
end

function LayerNorm:reset()
  if self.weight then self.weight:fill(1) end
  if self.bias then self.bias:zero() end
  return self
end

function LayerNorm:__tostring__()
  local s = string.format('nn.LayerNorm(%s', table.concat(self.normalized_shape, 'x'))
  if self.eps ~= 1e-5 then s = s .. ', eps ' .. self.eps end
  if not self.elementwise_affine then s = s .. ', no affine' end
  return s .. ')'
end

-- the parameters and their gradients as 1-D views (the C entry takes norm_size elements)
local function flat(t, n)
  if t == nil then return nil end
  return t:dim() == 1 and t or t:view(n)
end

function LayerNorm:updateOutput(input)
  local ok, err = pcall(F._norm_size, tostring(self), input, self.normalized_shape)
  if not ok then error(nn._strip_position(err), 0) end
  local n = self.normSize
  local rows = input:numel() / n
  self.output = nn._buffer(self.output, input:size(), input)
  local sdt = F._stat_dtype(input)
  self.mean = nn._buffer(self.mean, { rows }, sdt, input.desc.device)
  self.rstd = nn._buffer(self.rstd, { rows }, sdt, input.desc.device)
  F.layer_norm_forward(self.output, self.mean, self.rstd, input, flat(self.weight, n), flat(self.bias, n), n, self.eps)
  return self.output
end

function LayerNorm:_backward(input, gradOutput, gi, gw, gb)
  local n = self.normSize
  F.layer_norm_backward(gi, flat(gw, n), flat(gb, n), gradOutput, input, self.mean, self.rstd, flat(self.weight, n), n)
end

function LayerNorm:updateGradInput(input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(input, gradOutput, self.gradInput, nil, nil)
  return self.gradInput
end

function LayerNorm:accGradParameters(input, gradOutput, scale)
  if not self.weight then return end
  self:_backward(input, nn._scaled(self, gradOutput, scale), nil, self.gradWeight, self.bias and self.gradBias)
end

function LayerNorm:backward(input, gradOutput, scale)
  if scale ~= nil and scale ~= 1 then return nn.Module.backward(self, input, gradOutput, scale) end
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(input, gradOutput, self.gradInput, self.gradWeight, self.bias and self.gradBias)
  return self.gradInput
end

return LayerNorm
