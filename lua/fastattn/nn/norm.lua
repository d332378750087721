-- norm.lua: nn.LayerNorm(normalized_shape, eps = 1e-5, elementwise_affine = true), as PyTorch's:
-- normalises over the trailing dims given by normalized_shape (a number or a table of sizes).
-- Also nn.LayerNorm{normalized_shape=, eps=, elementwise_affine=, bias=}. Parameters weight (ones) and
-- bias (zeros) of size normalized_shape.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local E = require 'fastattn.errors'
local op = F._impl

local LayerNorm = nn.class('LayerNorm', nn.Module)

local KEYS = { normalized_shape = true, eps = true, elementwise_affine = true, bias = true }
function LayerNorm:__init(normalized_shape, eps, elementwise_affine)
  nn.Module.__init(self)
  local fn = 'fa.nn.LayerNorm'
  local bias = true
  if type(normalized_shape) == 'table' and normalized_shape.normalized_shape then
    local o = E.opts(fn, 'opts', normalized_shape, KEYS)
    normalized_shape, eps, elementwise_affine = o.normalized_shape, o.eps, o.elementwise_affine
    bias = E.boolean(fn, 'bias', o.bias, true) ~= false
  end
  local ns = type(normalized_shape) == 'number' and { normalized_shape } or normalized_shape
  if type(ns) ~= 'table' or fa.isTensor(ns) or #ns == 0 then
    E.argv(fn, 'normalized_shape', 'a size or a table of sizes', normalized_shape)
  end
  local n = 1
  for i, s in ipairs(ns) do n = n * E.integer(fn, 'normalized_shape[' .. i .. ']', s, 1) end
  self.normalized_shape = { unpack(ns) }
  self.normSize = n
  self.eps = E.number(fn, 'eps', eps == nil and 1e-5 or eps)
  self.elementwise_affine = E.boolean(fn, 'elementwise_affine', elementwise_affine, true) ~= false
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

function LayerNorm:updateOutput(input)
  local fn = self.__fnForward
  nn._checkInput(fn, 'input', input, self.weight)
  local n = self.normSize
  local rows = F._norm_size(fn, input, self.normalized_shape) > 0 and input:numel() / n or 0
  self.output = nn._buffer(self.output, input:size(), input)
  local sdt = F._stat_dtype(input)
  self.mean = nn._buffer(self.mean, { rows }, sdt, input.desc.device)
  self.rstd = nn._buffer(self.rstd, { rows }, sdt, input.desc.device)
  op.layer_norm(fn, input, self.normalized_shape, self.weight, self.bias, self.eps,
                { out = self.output, mean = self.mean, rstd = self.rstd })
  return self.output
end

-- checks input and gradOutput for a backward named fn
function LayerNorm:_checkBackward(fn, input, gradOutput)
  nn._checkInput(fn, 'input', input, self.weight)
  nn._checkGradOutput(fn, gradOutput, input, input:size())
end

function LayerNorm:_backward(fn, input, gradOutput, gi, gw, gb)
  op.layer_norm_backward(fn, gradOutput, input, self.mean, self.rstd, self.weight, self.normalized_shape,
                         { grad_input = gi, grad_weight = gw, grad_bias = gb })
end

function LayerNorm:updateGradInput(input, gradOutput)
  local fn = self.__fnUpdateGradInput
  self:_checkBackward(fn, input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(fn, input, gradOutput, self.gradInput, false, false)
  return self.gradInput
end

function LayerNorm:accGradParameters(input, gradOutput, scale)
  if not self.weight then return end
  local fn = self.__fnAccGradParameters
  self:_checkBackward(fn, input, gradOutput)
  self:_backward(fn, input, nn._scaled(self, gradOutput, scale), false, self.gradWeight, self.bias and self.gradBias or false)
end

function LayerNorm:backward(input, gradOutput, scale)
  if scale ~= nil and scale ~= 1 then return nn.Module.backward(self, input, gradOutput, scale) end
  local fn = self.__fnBackward
  self:_checkBackward(fn, input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(fn, input, gradOutput, self.gradInput, self.weight and self.gradWeight or false,
                 self.bias and self.gradBias or false)
  return self.gradInput
end

return LayerNorm
