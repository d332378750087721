-- activation.lua: nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid (elementwise, any shape) and nn.Softmax(dim),
-- nn.LogSoftmax(dim) (dim 1-based, negative from the end; default -1, the last dim).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local function check_input(self, input)
  if not fa.isTensor(input) then
    error(string.format('%s: expected a tensor input, got %s', tostring(self), type(input)), 0)
  end
end

for name, op in pairs({ GELU = 'gelu', ReLU = 'relu', Tanh = 'tanh', Sigmoid = 'sigmoid' }) do
  local cls = nn.class(name, nn.Module)
  local id = fa.UNARY[op]
  function cls:__init()
    nn.Module.__init(self)
  end
  function cls:updateOutput(input)
    check_input(self, input)
    self.output = nn._buffer(self.output, input:size(), input)
    return F.unary_forward(id, self.output, input)
  end
  function cls:updateGradInput(input, gradOutput)
    self.gradInput = nn._buffer(self.gradInput, input:size(), input)
    return F.unary_backward(id, self.gradInput, gradOutput, input, self.output)
  end
end

-- GELU: exact (erf) form, PyTorch's default; GELU{approximate='tanh'} is not supported
local GELU = nn.GELU
function GELU:__init(opts)
  nn.Module.__init(self)
  local approx = type(opts) == 'table' and opts.approximate or opts
  if approx ~= nil and approx ~= 'none' then
    error("nn.GELU: only approximate = 'none' (the exact erf form) is supported, got " .. tostring(approx), 3)
  end
end

for name, log in pairs({ Softmax = false, LogSoftmax = true }) do
  local cls = nn.class(name, nn.Module)
  function cls:__init(dim)
    nn.Module.__init(self)
    if type(dim) == 'table' then dim = dim.dim end
    if dim ~= nil and (type(dim) ~= 'number' or dim == 0) then
      error(string.format('nn.%s: expected a dimension (1-based, or negative from the end), got %s', name, tostring(dim)), 3)
    end
    self.dim = dim or -1
  end
  function cls:__tostring__() return string.format('nn.%s(dim %d)', name, self.dim) end
  function cls:_dim0(input)
    local ok, d = pcall(F._dim0, tostring(self), input, self.dim)
    if not ok then error(nn._strip_position(d), 0) end
    return d
  end
  function cls:updateOutput(input)
    check_input(self, input)
    local d = self:_dim0(input)
    self.output = nn._buffer(self.output, input:size(), input)
    return F.softmax_forward(self.output, input, d, log)
  end
  function cls:updateGradInput(input, gradOutput)
    self.gradInput = nn._buffer(self.gradInput, input:size(), input)
    return F.softmax_backward(self.gradInput, gradOutput, self.output, self:_dim0(input), log)
  end
end

return nn.GELU
