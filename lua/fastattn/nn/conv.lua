-- conv.lua: nn.Conv2d, as PyTorch's: (N, C, H, W) -> (N, O, Ho, Wo).
--   nn.Conv2d(in, out, kernel, stride = 1, padding = 0, dilation = 1, groups = 1, bias = true)
--   nn.Conv2d{in_channels=, out_channels=, kernel_size=, stride=, padding=, dilation=, groups=, bias=}
-- kernel/stride/padding/dilation are a number or {h, w}; padding may be 'valid' or 'same' (stride 1,
-- odd effective kernel). Parameters weight (out, in/groups, kh, kw), bias (out), initialised as
-- PyTorch's: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in/groups * kh * kw.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local Conv2d = nn.class('Conv2d', nn.Module)

local function pair(v)
  if type(v) == 'table' then return v[1], v[2] or v[1] end
  return v, v
end

function Conv2d:__init(inC, outC, kernel, stride, padding, dilation, groups, bias)
  nn.Module.__init(self)
  if type(inC) == 'table' then
    local o = inC
    inC, outC, kernel = o.in_channels or o[1], o.out_channels or o[2], o.kernel_size or o[3]
    stride, padding, dilation, groups, bias = o.stride, o.padding, o.dilation, o.groups, o.bias
  end
  groups = groups or 1
  local function bad(what) error('nn.Conv2d: ' .. what, 4) end
  if type(inC) ~= 'number' or type(outC) ~= 'number' or inC < 1 or outC < 1 then
    bad(string.format('expected in_channels and out_channels as positive integers, got %s, %s', tostring(inC), tostring(outC)))
  end
  if type(groups) ~= 'number' or groups < 1 or inC % groups ~= 0 or outC % groups ~= 0 then
    bad(string.format('groups %s must divide in_channels %d and out_channels %d', tostring(groups), inC, outC))
  end
  local kh, kw = pair(kernel)
  if type(kh) ~= 'number' or type(kw) ~= 'number' or kh < 1 or kw < 1 then
    bad('expected kernel_size as a positive number or {h, w}, got ' .. tostring(kernel))
  end
  self.in_channels, self.out_channels, self.groups = inC, outC, groups
  self.kH, self.kW = kh, kw
  self._p = F.conv2d_params('nn.Conv2d', kh, kw, stride, padding, dilation, groups)
  local p = self._p
  self.dH, self.dW, self.padH, self.padW = p.stride_h, p.stride_w, p.pad_h, p.pad_w
  self.dilationH, self.dilationW = p.dilation_h, p.dilation_w
  self:registerParameter('weight', fa.empty(outC, inC / groups, kh, kw))
  if bias ~= false then self:registerParameter('bias', fa.empty(outC)) end
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
  local ok, shape = pcall(F.conv2d_output_size, tostring(self), input, self.weight, self.bias, self._p)
  if not ok then error(nn._strip_position(shape), 0) end
  self.output = nn._buffer(self.output, shape, input)
  return F.conv2d_forward(self.output, input, self.weight, self.bias, self._p)
end

function Conv2d:updateGradInput(input, gradOutput)
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  F.conv2d_backward(self.gradInput, nil, nil, gradOutput, input, self.weight, self._p)
  return self.gradInput
end

function Conv2d:accGradParameters(input, gradOutput, scale)
  F.conv2d_backward(nil, self.gradWeight, self.bias and self.gradBias, nn._scaled(self, gradOutput, scale),
                    input, self.weight, self._p)
end

function Conv2d:backward(input, gradOutput, scale)
  if scale ~= nil and scale ~= 1 then return nn.Module.backward(self, input, gradOutput, scale) end
  self.gradInput = nn._buffer(self.gradInput, input:size(), input)
  F.conv2d_backward(self.gradInput, self.gradWeight, self.bias and self.gradBias, gradOutput, input, self.weight,
                    self._p)
  return self.gradInput
end

return Conv2d
