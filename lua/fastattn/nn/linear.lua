-- linear.lua: nn.Linear(in, out, bias = true): y = x W^T + b over the last dim of x (..., in) -> (..., out).
-- Parameters weight (out, in), bias (out), initialised as PyTorch's: U(-1/sqrt(in), 1/sqrt(in)).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local Linear = nn.class('Linear', nn.Module)

function Linear:__init(inputSize, outputSize, bias)
  nn.Module.__init(self)
  if type(inputSize) == 'table' then -- nn.Linear{in_features=, out_features=, bias=}
    local o = inputSize
    inputSize, outputSize = o.in_features or o[1], o.out_features or o[2]
    bias = o.bias
  end
  if type(inputSize) ~= 'number' or type(outputSize) ~= 'number' or inputSize < 1 or outputSize < 1 then
    error(string.format('nn.Linear: expected (inputSize, outputSize) as positive integers, got (%s, %s)',
          tostring(inputSize), tostring(outputSize)), 3)
  end
  self.inputSize, self.outputSize = inputSize, outputSize
  self:registerParameter('weight', fa.empty(outputSize, inputSize))
  if bias ~= false then self:registerParameter('bias', fa.empty(outputSize)) end
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

function Linear:_check(input)
  if not fa.isTensor(input) then
    error(string.format('%s: expected a tensor input, got %s', tostring(self), type(input)), 0)
  end
  if input:dim() < 1 or input:size(-1) ~= self.inputSize then
    error(string.format('%s: expected input of size (..., %d), got %s', tostring(self), self.inputSize,
          fa._shape_str(input, 'x')), 0)
  end
end

function Linear:updateOutput(input)
  self:_check(input)
  local shape = input:size()
  shape[#shape] = self.outputSize
  self.output = nn._buffer(self.output, shape, input)
  return F.linear_forward(self.output, nn._contiguous(self, '_inputC', input), self.weight, self.bias)
end

function Linear:updateGradInput(input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  F.linear_backward(self.gradInput, nil, nil, nn._contiguous(self, '_gradOutputC', gradOutput),
                    nn._contiguous(self, '_inputC', input), self.weight)
  return self.gradInput
end

function Linear:accGradParameters(input, gradOutput, scale)
  F.linear_backward(nil, self.gradWeight, self.bias and self.gradBias,
                    nn._contiguous(self, '_gradOutputC', nn._scaled(self, gradOutput, scale)),
                    nn._contiguous(self, '_inputC', input), self.weight)
end

-- one fused C call for both directions
function Linear:backward(input, gradOutput, scale)
  if scale ~= nil and scale ~= 1 then return nn.Module.backward(self, input, gradOutput, scale) end
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  F.linear_backward(self.gradInput, self.gradWeight, self.bias and self.gradBias,
                    nn._contiguous(self, '_gradOutputC', gradOutput), nn._contiguous(self, '_inputC', input),
                    self.weight)
  return self.gradInput
end

return Linear
