-- shape.lua: modules that only change the view of a tensor (no copy when the input is contiguous):
--   nn.Identity()                        output = input, gradInput = gradOutput
--   nn.Flatten(start_dim = 2, end_dim = -1)   PyTorch's nn.Flatten with 1-based dims: (N, C, H, W) -> (N, C*H*W)
--   nn.View(sizes...)                    Torch7's nn.View: input:view(sizes), one size may be -1;
--                                        View(...):setNumInputDims(n) keeps the leading (batch) dims
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local E = require 'fastattn.errors'

---------------------------------------------------------------------------- nn.Identity
local Identity = nn.class('Identity', nn.Module)
function Identity:updateOutput(input)
  self.output = input
  return input
end
function Identity:updateGradInput(input, gradOutput)
  self.gradInput = gradOutput
  return gradOutput
end

-- the gradient of a pure view: gradOutput seen with the input's shape
local function view_back(self, input, gradOutput)
  local fn = self.__fnUpdateGradInput
  E.tensor(fn, 'input', input)
  E.tensor(fn, 'gradOutput', gradOutput)
  if gradOutput:numel() ~= input:numel() then
    E.arg(fn, 'gradOutput', string.format("a tensor of %d elements (the input's)", input:numel()), gradOutput)
  end
  if gradOutput:isContiguous() then
    self.gradInput = gradOutput:view(input:size())
  else
    self._gradInput = nn._buffer(self._gradInput, gradOutput:size(), gradOutput)
    self._gradInput:copy(gradOutput)
    self.gradInput = self._gradInput:view(input:size())
  end
  return self.gradInput
end

-- input seen with `shape`; copies a non-contiguous input into a kept buffer first
local function view_fwd(self, input, shape)
  local x = input
  if not x:isContiguous() then
    self._input = nn._buffer(self._input, x:size(), x)
    x = self._input:copy(input)
  end
  self.output = x:view(shape)
  return self.output
end

local function check_tensor(self, input) E.tensor(self.__fnForward, 'input', input) end

---------------------------------------------------------------------------- nn.Flatten
local Flatten = nn.class('Flatten', nn.Module)
function Flatten:__init(start_dim, end_dim)
  nn.Module.__init(self)
  self.start_dim = E.integer('fa.nn.Flatten', 'start_dim', start_dim == nil and 2 or start_dim)
  self.end_dim = E.integer('fa.nn.Flatten', 'end_dim', end_dim == nil and -1 or end_dim)
end
function Flatten:__tostring__() return string.format('nn.Flatten(%d, %d)', self.start_dim, self.end_dim) end
function Flatten:updateOutput(input)
  check_tensor(self, input)
  local n = input:dim()
  local s = self.start_dim < 0 and n + self.start_dim + 1 or self.start_dim
  local e = self.end_dim < 0 and n + self.end_dim + 1 or self.end_dim
  if s < 1 or e > n or s > e then
    E.arg(self.__fnForward, 'input', string.format('a tensor with dims %d..%d', self.start_dim, self.end_dim), input)
  end
  local sizes, shape, k = input:size(), {}, 1
  for i = 1, s - 1 do shape[#shape + 1] = sizes[i] end
  for i = s, e do k = k * sizes[i] end
  shape[#shape + 1] = k
  for i = e + 1, n do shape[#shape + 1] = sizes[i] end
  return view_fwd(self, input, shape)
end
Flatten.updateGradInput = view_back

---------------------------------------------------------------------------- nn.View
local View = nn.class('View', nn.Module)
function View:__init(...)
  nn.Module.__init(self)
  local a = ...
  local n = select('#', ...)
  if type(a) == 'table' and not fa.isTensor(a) then self.size, n = { unpack(a) }, #a else self.size = { ... } end
  if n == 0 then E.fail('fa.nn.View', 'expected sizes, got none') end
  local max = tonumber(fa.C.FA_MAX_DIMS)
  if n > max then E.arg('fa.nn.View', 'sizes', string.format('at most %d sizes', max), tostring(n)) end
  for i = 1, n do E.integer('fa.nn.View', 'size[' .. i .. ']', self.size[i], -1) end
  self.numInputDims = nil
end
function View:setNumInputDims(n)
  self.numInputDims = E.integer('fa.nn.View:setNumInputDims', 'n', n, 0)
  return self
end
function View:__tostring__() return 'nn.View(' .. table.concat(self.size, 'x') .. ')' end
function View:updateOutput(input)
  check_tensor(self, input)
  local shape = { unpack(self.size) }
  if self.numInputDims and input:dim() > self.numInputDims then
    -- leading batch dims stay
    local sizes = input:size()
    local lead = {}
    for i = 1, input:dim() - self.numInputDims do lead[i] = sizes[i] end
    for _, v in ipairs(shape) do lead[#lead + 1] = v end
    shape = lead
  end
  local numel, known, infer = input:numel(), 1, false
  for _, v in ipairs(shape) do
    if v == -1 then infer = true else known = known * v end
  end
  if (infer and (known == 0 or numel % known ~= 0)) or (not infer and known ~= numel) then
    E.arg(self.__fnForward, 'input', string.format('a tensor of %s elements (to view as %s)',
          infer and ('a multiple of ' .. known) or tostring(known), table.concat(shape, 'x')), input)
  end
  return view_fwd(self, input, shape)
end
View.updateGradInput = view_back

return Identity
