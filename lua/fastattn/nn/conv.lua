-- conv.lua: nn.Conv2d, as PyTorch's: (N, C, H, W) -> (N, O, Ho, Wo).
--   nn.Conv2d(in, out, kernel, stride = 1, padding = 0, dilation = 1, groups = 1, bias = true)
--   nn.Conv2d{in_channels=, out_channels=, kernel_size=, stride=, padding=, dilation=, groups=, bias=}
-- kernel/stride/padding/dilation are a number or {h, w}; padding may be 'valid' or 'same' (stride 1,
-- odd effective kernel). Parameters weight (out, in/groups, kh, kw), bias (out), initialised as
-- PyTorch's: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in/groups * kh * kw.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local E = require 'fastattn.errors'
local op = F._impl

local Conv2d = nn.class('Conv2d', nn.Module)

local function pair(v)
  if type(v) == 'table' then return v[1], v[2] == nil and v[1] or v[2] end
  return v, v
end

local KEYS = { in_channels = true, out_channels = true, kernel_size = true, stride = true, padding = true,
               dilation = true, groups = true, bias = true }
function Conv2d:__init(inC, outC, kernel, stride, padding, dilation, groups, bias)
  nn.Module.__init(self)
  local fn = 'fa.nn.Conv2d'
  if type(inC) == 'table' then
    local o = nn._opts(fn, inC, KEYS, 3)
    inC, outC, kernel = o.in_channels or o[1], o.out_channels or o[2], o.kernel_size or o[3]
    stride, padding, dilation, groups, bias = o.stride, o.padding, o.dilation, o.groups, o.bias
  end
  E.integer(fn, 'in_channels', inC, 1)
  E.integer(fn, 'out_channels', outC, 1)
  groups = E.integer(fn, 'groups', groups == nil and 1 or groups, 1)
  if inC % groups ~= 0 or outC % groups ~= 0 then
    E.argv(fn, 'groups', string.format('a divisor of in_channels %d and out_channels %d', inC, outC), groups)
  end
  E.boolean(fn, 'bias', bias, true)
  local kh, kw = pair(kernel)
  if type(kh) ~= 'number' or type(kw) ~= 'number' or not (kh >= 1 and kw >= 1 and kh < 2^31 and kw < 2^31)
     or kh ~= math.floor(kh) or kw ~= math.floor(kw) then
    E.argv(fn, 'kernel_size', 'a positive integer or {h, w}', kernel)
  end
  self.in_channels, self.out_channels, self.groups = inC, outC, groups
  self.kH, self.kW = kh, kw
  self._p = F._conv_params(fn, kh, kw, { stride = stride, padding = padding, dilation = dilation, groups = groups })
  local p = self._p
  self.dH, self.dW, self.padH, self.padW = p.stride_h, p.stride_w, p.pad_h, p.pad_w
  self.dilationH, self.dilationW = p.dilation_h, p.dilation_w
  self:registerParameter('weight', nn._param(fn, { outC, inC / groups, kh, kw },
                                             { 'in_channels', 'out_channels', 'kernel_size' }))
  if bias ~= false then self:registerParameter('bias', nn._param(fn, { outC }, { 'out_channels' })) end
  self:reset()
end

function Conv2d:reset()
  local bound = 1 / math.sqrt(self.in_channels / self.groups * self.kH * self.kW)
  self.weight:uniform(-bound, bound)
  if self.bias then self.bias:uniform(-bound, bound) end
  return self
end

function Conv2d:__tostring__()
  local s = string.format('nn.Conv2d(%d -> %d, %dx%d', self.in_channels, self.out_channels, self.kH, self.kW)
  if self.dH ~= 1 or self.dW ~= 1 or self.padH ~= 0 or self.padW ~= 0 then
    s = s .. string.format(', stride %d,%d, pad %d,%d', self.dH, self.dW, self.padH, self.padW)
  end
  if self.dilationH ~= 1 or self.dilationW ~= 1 then s = s .. string.format(', dilation %d,%d', self.dilationH, self.dilationW) end
  if self.groups ~= 1 then s = s .. ', groups ' .. self.groups end
  if not self.bias then s = s .. ', no bias' end
  return s .. ')'
end

function Conv2d:updateOutput(input)
  local fn = self.__fnForward
  nn._checkInput(fn, 'input', input, self.weight)
  return op.conv2d(fn, input, self.weight, self.bias, { out = self:_outBuffer(fn, input) }, self._p)
end

-- self.output resized to the output size of `input` (checked on the way)
function Conv2d:_outBuffer(fn, input)
  self.output = nn._buffer(self.output, self:_outShape(fn, input), input)
  return self.output
end

-- the output size for `input` (checked)
function Conv2d:_outShape(fn, input)
  local p = self._p
  local H, W = input:dim() == 4 and input:size(3) or 0, input:dim() == 4 and input:size(4) or 0
  local Ho = math.floor((H + 2 * p.pad_h - p.dilation_h * (self.kH - 1) - 1) / p.stride_h) + 1
  local Wo = math.floor((W + 2 * p.pad_w - p.dilation_w * (self.kW - 1) - 1) / p.stride_w) + 1
  if input:dim() ~= 4 or input:size(2) ~= self.in_channels then
    E.arg(fn, 'input', string.format('a tensor of size (N, %d, H, W)', self.in_channels), input)
  end
  if Ho < 1 or Wo < 1 then F._kernel_too_large(fn, input, self.kH, self.kW, p) end
  return { input:size(1), self.out_channels, Ho, Wo }
end

-- checks input and gradOutput for a backward named fn
function Conv2d:_checkBackward(fn, input, gradOutput)
  nn._checkInput(fn, 'input', input, self.weight)
  nn._checkGradOutput(fn, gradOutput, self.weight, self:_outShape(fn, input))
end

function Conv2d:_backward(fn, input, gradOutput, gi, gw, gb)
  op.conv2d_backward(fn, gradOutput, input, self.weight, { grad_input = gi, grad_weight = gw, grad_bias = gb }, self._p)
end

function Conv2d:updateGradInput(input, gradOutput)
  local fn = self.__fnUpdateGradInput
  self:_checkBackward(fn, input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(fn, input, gradOutput, self.gradInput, false, false)
  return self.gradInput
end

function Conv2d:accGradParameters(input, gradOutput, scale)
  local fn = self.__fnAccGradParameters
  self:_checkBackward(fn, input, gradOutput)
  self:_backward(fn, input, nn._scaled(self, gradOutput, scale), false, self.gradWeight, self.bias and self.gradBias or false)
end

function Conv2d:backward(input, gradOutput, scale)
  if scale ~= nil and scale ~= 1 then return nn.Module.backward(self, input, gradOutput, scale) end
  local fn = self.__fnBackward
  self:_checkBackward(fn, input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  self:_backward(fn, input, gradOutput, self.gradInput, self.gradWeight, self.bias and self.gradBias or false)
  return self.gradInput
end

return Conv2d
