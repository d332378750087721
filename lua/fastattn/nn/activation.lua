-- activation.lua: nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid (elementwise, any shape) and nn.Softmax(dim),
-- nn.LogSoftmax(dim) (dim 1-based, negative from the end; default -1, the last dim).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'
local E = require 'fastattn.errors'
local op = F._impl

for name, opname in pairs({ GELU = 'gelu', ReLU = 'relu', Tanh = 'tanh', Sigmoid = 'sigmoid' }) do
  local cls = nn.class(name, nn.Module)
  local id = F._unary_op[opname]
  function cls:__init()
    nn.Module.__init(self)
  end
  function cls:updateOutput(input)
    local fn = self.__fnForward
    E.tensor(fn, 'input', input)
    self.output = nn._buffer(self.output, input:size(), input)
    return op.unary(fn, id, input, { out = self.output })
  end
  function cls:updateGradInput(input, gradOutput)
    local fn = self.__fnUpdateGradInput
    E.tensor(fn, 'input', input)
    nn._checkGradOutput(fn, gradOutput, input, input:size())
    -- the forward's output where it fits (the derivative then reads it), else the derivative from the input
    local y = self.output
    if not (fa.isTensor(y) and y:isSameSizeAs(input) and y.desc.dtype == input.desc.dtype) then y = nil end
    self.gradInput = nn._buffer(self.gradInput, input:size(), input)
    return op.unary_backward(fn, id, gradOutput, input, { output = y, grad_input = self.gradInput })
  end
end

-- GELU: exact (erf) form, PyTorch's default; GELU{approximate='tanh'} is not available
local GELU = nn.GELU
function GELU:__init(opts)
  nn.Module.__init(self)
  local approx = opts
  if type(opts) == 'table' then approx = E.opts('fa.nn.GELU', 'opts', opts, { approximate = true }).approximate end
  E.string('fa.nn.GELU', 'approximate', approx, { 'none' }, true)
end

for name, log in pairs({ Softmax = false, LogSoftmax = true }) do
  local cls = nn.class(name, nn.Module)
  function cls:__init(dim)
    nn.Module.__init(self)
    local fn = 'fa.nn.' .. name
    if type(dim) == 'table' then dim = E.opts(fn, 'opts', dim, { dim = true }).dim end
    if dim ~= nil and (type(dim) ~= 'number' or dim == 0 or dim ~= math.floor(dim)) then
      E.argv(fn, 'dim', 'a dimension (1-based, or negative from the end)', dim)
    end
    self.dim = dim or -1
  end
  function cls:__tostring__() return string.format('nn.%s(dim %d)', name, self.dim) end
  function cls:updateOutput(input)
    local fn = self.__fnForward
    E.tensor(fn, 'input', input)
    self.output = nn._buffer(self.output, input:size(), input)
    return op.softmax(fn, log, input, self.dim, { out = self.output })
  end
  function cls:updateGradInput(input, gradOutput)
    local fn = self.__fnUpdateGradInput
    E.tensor(fn, 'input', input)
    nn._checkGradOutput(fn, gradOutput, input, input:size())
    if self.output == nil or not self.output:isSameSizeAs(input) then
      E.fail(fn, 'expected the input of the last forward (call forward first)')
    end
    self.gradInput = nn._buffer(self.gradInput, input:size(), input)
    return op.softmax_backward(fn, log, gradOutput, self.output, self.dim, { grad_input = self.gradInput })
  end
end

return nn.GELU
