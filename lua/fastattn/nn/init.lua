-- fastattn.nn: Torch7-style modules (DESIGN §3). `local nn = require 'fastattn.nn'` (or `fa.nn`).
--
-- Every module: forward(input) / backward(input, gradOutput) (= updateGradInput, then accGradParameters,
-- which ADDS into the parameter gradients), zeroGradParameters(), parameters(), getParameters() (flat
-- views, idempotent), namedParameters() / namedGradParameters() / stateDict() / loadStateDict() with
-- PyTorch's state_dict names, training() / evaluate(), type() / float() / double() / cuda(), clone(),
-- m(x) as m:forward(x).
-- Modules keep their `output` and `gradInput` tensors and resize them, so a steady training loop does not
-- allocate: the returned tensors are overwritten by the next call (copy them to keep them).
--
-- Layout: one small file per module family. MODULES below is the one list of what fa.nn has: class name
-- -> file. The core families load with fa.nn; the attention layers load the first time their name is
-- read. A new layer file adds its names here.
local E = require 'fastattn.errors'

local nn = {}
package.loaded['fastattn.nn'] = nn -- the family files require this table back while it loads

local CORE = { 'module', 'container', 'linear', 'conv', 'norm', 'activation', 'dropout', 'grid_sample',
               'criterion', 'shape' }

local MODULES = {
  Module = 'module',
  Container = 'container', Sequential = 'container', ModuleList = 'container',
  Linear = 'linear',
  Conv2d = 'conv',
  LayerNorm = 'norm',
  GELU = 'activation', ReLU = 'activation', Tanh = 'activation', Sigmoid = 'activation',
  Softmax = 'activation', LogSoftmax = 'activation',
  Dropout = 'dropout',
  GridSample = 'grid_sample',
  Criterion = 'criterion', MSECriterion = 'criterion', CrossEntropyCriterion = 'criterion',
  Identity = 'shape', Flatten = 'shape', View = 'shape',
  MSDeformAttn = 'msdeformattn',
  TriangleAttention = 'triangle_attention',
  DeformableAttention2D = 'deformable_attention2d',
  DeformableSDPA = 'deformable_sdpa',
}
nn._MODULES = MODULES

for _, f in ipairs(CORE) do require('fastattn.nn.' .. f) end

-- edit distance, for "did you mean"
local function distance(a, b)
  a, b = a:lower(), b:lower()
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a:byte(i) == b:byte(j) and 0 or 1))
    end
    prev = cur
  end
  return prev[#b]
end

setmetatable(nn, {
  __index = function(t, k)
    if type(k) ~= 'string' or k:sub(1, 1) == '_' then return nil end
    local file = MODULES[k]
    if file then
      require('fastattn.nn.' .. file)
      local v = rawget(t, k)
      if v ~= nil then return v end
    end
    local best, bd = nil, 3
    for name in pairs(MODULES) do
      local d = distance(k, name)
      if d < bd or (d == bd and best and name < best) then best, bd = name, d end
    end
    E.raise(string.format("fa.nn: no module '%s'%s", k, best and string.format(" (did you mean '%s'?)", best) or ''))
  end,
})

return nn
