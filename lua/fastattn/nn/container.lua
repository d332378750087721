-- container.lua: nn.Container (a list of modules), nn.Sequential and nn.ModuleList.
-- Children of a container are named '0', '1', ... in the state dict, as PyTorch's nn.Sequential does;
-- get(i) and the error messages count from 1, as Torch7 does.
local nn = require 'fastattn.nn'

local Container = nn.class('Container', nn.Module)

function Container:__init(...)
  nn.Module.__init(self)
  self.modules = {}
  local args = { ... }
  -- nn.Sequential(m1, m2, ...) or nn.ModuleList({m1, m2, ...})
  if #args == 1 and type(args[1]) == 'table' and not nn.isModule(args[1]) then args = args[1] end
  for _, m in ipairs(args) do self:add(m) end
end

function Container:add(m, index)
  if not nn.isModule(m) then
    error(string.format('%s:add: expected a module, got %s', nn.typename(self), type(m)), 2)
  end
  if index then table.insert(self.modules, index, m) else self.modules[#self.modules + 1] = m end
  return self
end
function Container:insert(m, index) return self:add(m, index) end
function Container:remove(index)
  index = index or #self.modules
  return table.remove(self.modules, index)
end
function Container:get(i) return self.modules[i] end
function Container:size() return #self.modules end

function Container:namedChildren()
  local out = {}
  for i, m in ipairs(self.modules) do out[i] = { tostring(i - 1), m } end
  for _, c in ipairs(nn.Module.namedChildren(self)) do out[#out + 1] = c end
  return out
end

-- re-raises an error from child i with the child named: "Sequential: module 2 (nn.Linear(4 -> 3)): ..."
function Container:_childError(i, m, err)
  if type(err) ~= 'string' then error(err, 0) end
  local name = (nn.typename(self) or 'nn.Container'):gsub('^nn%.', '')
  error(string.format('%s: module %d (%s): %s', name, i, nn._describe(m), nn._strip_position(err)), 0)
end

function Container:__tostring__()
  local name = nn.typename(self)
  local lines = { name .. ' {' }
  local arrows = { '[input' }
  for i = 1, #self.modules do arrows[#arrows + 1] = '(' .. i .. ')' end
  arrows[#arrows + 1] = 'output]'
  lines[#lines + 1] = '  ' .. table.concat(arrows, ' -> ')
  for i, m in ipairs(self.modules) do
    local s = tostring(m):gsub('\n', '\n  ')
    lines[#lines + 1] = '  (' .. i .. '): ' .. s
  end
  lines[#lines + 1] = '}'
  return table.concat(lines, '\n')
end

---------------------------------------------------------------------------- nn.Sequential
local Sequential = nn.class('Sequential', Container)

function Sequential:updateOutput(input)
  local cur = input
  for i, m in ipairs(self.modules) do
    local ok, out = pcall(m.updateOutput, m, cur)
    if not ok then self:_childError(i, m, out) end
    cur = out
  end
  self.output = cur
  return cur
end

function Sequential:updateGradInput(input, gradOutput)
  local g = gradOutput
  for i = #self.modules, 1, -1 do
    local m = self.modules[i]
    local inp = i > 1 and self.modules[i - 1].output or input
    local ok, r = pcall(m.updateGradInput, m, inp, g)
    if not ok then self:_childError(i, m, r) end
    g = r
  end
  self.gradInput = g
  return g
end

function Sequential:accGradParameters(input, gradOutput, scale)
  local g = gradOutput
  for i = #self.modules, 1, -1 do
    local m = self.modules[i]
    local inp = i > 1 and self.modules[i - 1].output or input
    local ok, r = pcall(m.accGradParameters, m, inp, g, scale)
    if not ok then self:_childError(i, m, r) end
    g = m.gradInput
  end
end

function Sequential:backward(input, gradOutput, scale)
  scale = scale or 1
  local g = gradOutput
  for i = #self.modules, 1, -1 do
    local m = self.modules[i]
    local inp = i > 1 and self.modules[i - 1].output or input
    local ok, r = pcall(m.backward, m, inp, g, scale)
    if not ok then self:_childError(i, m, r) end
    g = r
  end
  self.gradInput = g
  return g
end

---------------------------------------------------------------------------- nn.ModuleList
-- a list of modules with no forward of its own (PyTorch's nn.ModuleList): children named '0', '1', ...
local ModuleList = nn.class('ModuleList', Container)
function ModuleList:updateOutput()
  error('nn.ModuleList has no forward: call its modules', 2)
end

return Container
