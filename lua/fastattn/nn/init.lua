-- fastattn.nn: Torch7-style modules (DESIGN §3). `local nn = require 'fastattn.nn'` (or `fa.nn`).
--
-- Every module: forward(input) / backward(input, gradOutput) (= updateGradInput, then accGradParameters,
-- which ADDS into the parameter gradients), zeroGradParameters(), parameters(), getParameters() (flat
-- views, idempotent), namedParameters() / stateDict() / loadStateDict() with PyTorch's state_dict names,
-- training() / evaluate(), type() / float() / double() / cuda(), clone(), m(x) as m:forward(x).
-- Modules keep their `output` and `gradInput` tensors and resize them, so a steady training loop does not
-- allocate: the returned tensors are overwritten by the next call (copy them to keep them).
--
-- Layout: one small file per module family (module.lua, container.lua, linear.lua, conv.lua, norm.lua,
-- activation.lua, dropout.lua, grid_sample.lua, criterion.lua, shape.lua). Other files in this directory
-- (the attention layers) are loaded the first time a name that the core does not define is asked for,
-- so a layer file needs no registration here: it does `local nn = require 'fastattn.nn'` and defines
-- `nn.class('Name', nn.Module)`.
local nn = {}
package.loaded['fastattn.nn'] = nn -- the family files require this table back while it loads

local core = { 'module', 'container', 'linear', 'conv', 'norm', 'activation', 'dropout', 'grid_sample',
               'criterion', 'shape' }
local is_core = {}
for _, f in ipairs(core) do
  is_core[f] = true
  require('fastattn.nn.' .. f)
end

local here = (debug.getinfo(1, 'S').source:match('^@(.*)/[^/]*$')) or '.'
local extensions_loaded = false

-- loads every other *.lua file of this directory once (sorted, so the order is reproducible)
local function load_extensions()
  if extensions_loaded then return end
  extensions_loaded = true
  local p = io.popen('ls -1 "' .. here .. '" 2>/dev/null')
  if not p then return end
  local files = {}
  for line in p:lines() do
    local name = line:match('^([%w_]+)%.lua$')
    if name and name ~= 'init' and not is_core[name] then files[#files + 1] = name end
  end
  p:close()
  table.sort(files)
  for _, name in ipairs(files) do require('fastattn.nn.' .. name) end
end
nn._load_extensions = load_extensions

setmetatable(nn, {
  __index = function(t, k)
    if type(k) ~= 'string' or k:sub(1, 1) == '_' then return nil end
    load_extensions()
    return rawget(t, k)
  end,
})

return nn
