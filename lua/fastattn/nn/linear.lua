-- linear.lua: nn.Linear(in, out, bias = true): y = x W^T + b over the last dim of x (..., in) -> (..., out).
-- Parameters weight (out, in), bias (out), initialised as PyTorch's: U(-1/sqrt(in), 1/sqrt(in)).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local E = require 'fastattn.errors'
local op = F._impl

local Linear = nn.class('Linear', nn.Module)

function Linear:__init(inputSize, outputSize, bias)
  nn.Module.__init(self)
  local fn = 'fa.nn.Linear'
  if type(inputSize) == 'table' then -- nn.Linear{in_features=, out_features=, bias=}
    local o = nn._opts(fn, inputSize, { in_features = true, out_features = true, bias = true }, 2)
    inputSize, outputSize = o.in_features or o[1], o.out_features or o[2]
    bias = o.bias
  end
  E.integer(fn, 'inputSize', inputSize, 1)
  E.integer(fn, 'outputSize', outputSize, 1)
  E.boolean(fn, 'bias', bias, true)
  self.inputSize, self.outputSize = inputSize, outputSize
  self:registerParameter('weight', nn._param(fn, { outputSize, inputSize }, { 'inputSize', 'outputSize' }))
  if bias ~= false then self:registerParameter('bias', nn._param(fn, { outputSize }, { 'outputSize' })) end
  self:reset()
end

-- reset(): PyTorch's default initialisation (kaiming_uniform(a = sqrt(5)) for the weight)
function Linear:reset()
  local bound = 1 / math.sqrt(self.inputSize)
  self.weight:uniform(-bound, bound)
  if self.bias then self.bias:uniform(-bound, bound) end
  return self
end

function Linear:__tostring__()
  return string.format('nn.Linear(%d -> %d%s)', self.inputSize, self.outputSize, self.bias and '' or ', no bias')
end

-- backward: also checks gradOutput
function Linear:_check(fn, input, gradOutput, backward)
  nn._checkInput(fn, 'input', input, self.weight)
  if input:dim() < 1 or input:size(-1) ~= self.inputSize then
    E.arg(fn, 'input', string.format('a tensor of size (..., %d)', self.inputSize), input)
  end
  if backward then
    local want = input:size()
    want[#want] = self.outputSize
    nn._checkGradOutput(fn, gradOutput, self.weight, want)
  end
end

function Linear:updateOutput(input)
  local fn = self.__fnForward
  self:_check(fn, input)
  local shape = input:size()
  shape[#shape] = self.outputSize
  self.output = nn._buffer(self.output, shape, input)
  return op.linear(fn, nn._contiguous(self, '_inputC', input), self.weight, self.bias, { out = self.output })
end

function Linear:_backward(fn, input, gradOutput, gi, gw, gb)
  self:_check(fn, input, gradOutput, true)
  op.linear_backward(fn, nn._contiguous(self, '_gradOutputC', gradOutput), nn._contiguous(self, '_inputC', input),
                     self.weight, { grad_input = gi, grad_weight = gw, grad_bias = gb })
end

function Linear:updateGradInput(input, gradOutput)
  local fn = self.__fnUpdateGradInput
  self:_check(fn, input, gradOutput, true)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(fn, input, gradOutput, self.gradInput, false, false)
  return self.gradInput
end

function Linear:accGradParameters(input, gradOutput, scale)
  local fn = self.__fnAccGradParameters
  self:_check(fn, input, gradOutput, true)
  self:_backward(fn, input, nn._scaled(self, gradOutput, scale), false, self.gradWeight, self.bias and self.gradBias or false)
end

-- one fused C call for both directions
function Linear:backward(input, gradOutput, scale)
  if scale ~= nil and scale ~= 1 then return nn.Module.backward(self, input, gradOutput, scale) end
  self:_check(self.__fnBackward, input, gradOutput, true)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(self.__fnBackward, input, gradOutput, self.gradInput, self.gradWeight, self.bias and self.gradBias or false)
  return self.gradInput
end

return Linear
