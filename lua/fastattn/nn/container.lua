-- container.lua: nn.Container (a list of modules), nn.Sequential and nn.ModuleList.
-- Children of a container are named '0', '1', ... in the state dict, as PyTorch's nn.Sequential does;
-- get(i) and the error messages count from 1, as Torch7 does.
local nn = require 'fastattn.nn'
local E = require 'fastattn.errors'

local Container = nn.class('Container', nn.Module)

function Container:__init(...)
  nn.Module.__init(self)
  self.modules = {}
  local fn = 'fa.' .. (nn.typename(self) or 'nn.Container')
  local n, args, name = select('#', ...), { ... }, 'modules'
  -- nn.Sequential(m1, m2, ...) or nn.ModuleList({m1, m2, ...})
  if n == 1 and type(args[1]) == 'table' and not nn.isModule(args[1]) then
    args, name = args[1], 'modules'
    n = #args
  end
  for i = 1, n do
    if not nn.isModule(args[i]) then E.argv(fn, string.format('%s[%d]', name, i), 'a module', args[i]) end
  end
  for i = 1, n do self:_add(fn, string.format('%s[%d]', name, i), args[i]) end
end

-- the modules of m's tree (m included), as a set
local function tree(m, set)
  set = set or {}
  if set[m] then return set end
  set[m] = true
  for _, c in ipairs(m:namedChildren()) do tree(c[2], set) end
  return set
end

-- adds m (checked) at index; a module already in this container's tree would run twice in one pass, its
-- kept output overwritten before its backward reads it, and a container inside itself would recurse forever:
-- both are refused (share parameters with :clone('weight', 'bias', ...) instead)
function Container:_add(fn, name, m, index)
  if not nn.isModule(m) then E.argv(fn, name, 'a module', m) end
  if tree(m)[self] then
    E.arg(fn, name, 'a module that does not contain this container', m == self and 'the container itself'
          or string.format('an %s that contains it (a cycle)', nn.typename(m) or 'module'))
  end
  local mine, theirs = tree(self), tree(m)
  for x in pairs(theirs) do
    if mine[x] then
      E.arg(fn, name, "a module not already in this container (use :clone() or share parameters)",
            string.format('%s%s that is already in it', x == m and '' or ('a module containing '),
                          'an ' .. (nn.typename(x) or 'module')))
    end
  end
  if index then table.insert(self.modules, index, m) else self.modules[#self.modules + 1] = m end
  return self
end

local function add(self, name, m, index)
  local fn = 'fa.' .. (nn.typename(self) or 'nn.Container') .. name
  if not nn.isModule(m) then E.argv(fn, 'module', 'a module', m) end
  E.integer(fn, 'index', index, 1, #self.modules + 1, true)
  return self:_add(fn, 'module', m, index)
end
function Container:add(m, index) return add(self, ':add', m, index) end
function Container:insert(m, index) return add(self, ':insert', m, index) end
function Container:remove(index)
  local fn = 'fa.' .. (nn.typename(self) or 'nn.Container') .. ':remove'
  if #self.modules == 0 then E.argv(fn, 'index', 'an index into the modules, but the container is empty', index) end
  index = E.integer(fn, 'index', index == nil and #self.modules or index, 1, #self.modules)
  return table.remove(self.modules, index)
end
function Container:get(i)
  local n = #self.modules
  if type(i) ~= 'number' or i ~= math.floor(i) or i < 1 or i > n then
    E.argv('fa.' .. (nn.typename(self) or 'nn.Container') .. ':get', 'index',
           n == 0 and 'an index into the modules, but the container is empty' or string.format('an integer in 1..%d', n), i)
  end
  return self.modules[i]
end
function Container:size() return #self.modules end

function Container:namedChildren()
  local out = {}
  for i, m in ipairs(self.modules) do out[i] = { tostring(i - 1), m } end
  for _, c in ipairs(nn.Module.namedChildren(self)) do out[#out + 1] = c end
  return out
end

-- re-raises an error from child i at the user's line, naming the child:
--   "fa.nn.Sequential:forward: module 2 (fa.nn.Linear): argument 'input': ..."
-- (the child's own "fa.nn.Linear:forward: " and the position its error carried are dropped)
function Container:_childError(fn, i, m, err)
  if type(err) ~= 'string' then error(err, 0) end -- not a message: pass it on untouched
  local child = 'fa.' .. (nn.typename(m) or 'nn.Module')
  local rest = err:match('^[^\n]-:%d+: (fa%..*)$') or err:match('^(fa%..*)$')
  if rest then
    local body = rest:match('^fa%.nn%.[%w_]+:[%w_]+: (.*)$')
    if body then rest = body end
  else
    rest = err
  end
  E.raise(string.format('%s: module %d (%s): %s', fn, i, child, rest))
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
    if not ok then self:_childError(self.__fnForward, i, m, out) end
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
    if not ok then self:_childError(self.__fnUpdateGradInput, i, m, r) end
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
    if not ok then self:_childError(self.__fnAccGradParameters, i, m, r) end
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
    if not ok then self:_childError(self.__fnBackward, i, m, r) end
    g = r
  end
  self.gradInput = g
  return g
end

---------------------------------------------------------------------------- nn.ModuleList
-- a list of modules with no forward of its own (PyTorch's nn.ModuleList): children named '0', '1', ...
local ModuleList = nn.class('ModuleList', Container)
function ModuleList:updateOutput()
  E.fail(self.__fnForward, 'a ModuleList has no forward: call its modules')
end

return Container
