-- optim.lua: fa.optim, Torch7's functional optimisers over flat parameters (DESIGN §3):
--
--   local params, grads = model:getParameters()
--   local config, state = { learningRate = 1e-3, weightDecay = 0.01 }, {}
--   local function feval(x) grads:zero(); ...forward/backward...; return loss, grads end
--   fa.optim.adamw(feval, params, config, state)   -- -> params, {loss}
--
-- Each step is one fused C call (fa_sgd_step / fa_adam_step) with PyTorch's update rules
-- (torch.optim.SGD / Adam / AdamW). Config keys (Torch7 names, PyTorch names accepted too):
--   all:   learningRate | lr, weightDecay | weight_decay
--   sgd:   momentum (0), dampening (0, as PyTorch), nesterov (false), learningRateDecay (0: Torch7's
--          lr / (1 + n * decay))
--   adam, adamw: beta1 (0.9), beta2 (0.999) | betas = {b1, b2}, epsilon | eps (1e-8); weightDecay defaults
--          to 0 for adam (L2 added to the gradient) and 0.01 for adamw (decoupled).
-- state (defaults to config, as in Torch7) keeps the step count (state.t) and the moment buffers.
-- config.learningRate may be changed between steps (that is how the schedules below are used).
--
-- fa.optim.clipGradNorm(grads, maxNorm) -> the global 2-norm before clipping (grads: a tensor or a table
--   of tensors), scaled in place by maxNorm / (norm + 1e-6) when that is below 1, as
--   torch.nn.utils.clip_grad_norm_.
-- Schedules: sched = fa.optim.StepLR{lr=, step_size=, gamma=0.1}, fa.optim.CosineLR{lr=, T_max=,
--   eta_min=0, warmup=0}; sched:get(step) is the learning rate after `step` steps (step counts from 0, as
--   PyTorch's last_epoch); sched:step() returns get(n) for n = 0, 1, 2, ... on successive calls.
--   CosineLR: linear warm-up over the first `warmup` steps ((step+1)/warmup * lr), then a half cosine
--   from lr down to eta_min, reached at step T_max (T_max counts the warm-up steps too); eta_min after.
local fa = require 'fastattn'
local C = fa.C

local optim = {}

local function opt(config, ...)
  for i = 1, select('#', ...) do
    local v = config[select(i, ...)]
    if v ~= nil then return v end
  end
end

local function check_step_args(fn, x, dfdx)
  if not fa.isTensor(x) then error(fn .. ': argument x: expected the flat parameter tensor, got ' .. type(x), 3) end
  if not fa.isTensor(dfdx) then
    error(fn .. ': feval must return (loss, gradient tensor); the gradient is ' .. type(dfdx), 3)
  end
  if not x:isSameSizeAs(dfdx) then
    error(string.format('%s: gradient of size %s for parameters of size %s', fn, fa._shape_str(dfdx, 'x'),
          fa._shape_str(x, 'x')), 3)
  end
end

-- a state buffer like x (zeros), kept across steps; recreated when x's shape, dtype or device changed
local function state_buffer(state, key, x)
  local b = state[key]
  if b == nil or not b:isSameSizeAs(x) or b.desc.dtype ~= x.desc.dtype or b.desc.device ~= x.desc.device then
    b = fa.zeros_like(x)
    state[key] = b
    return b, true
  end
  return b, false
end

---------------------------------------------------------------------------- SGD
function optim.sgd(feval, x, config, state)
  local fn = 'fa.optim.sgd'
  config = config or {}
  state = state or config
  local lr = opt(config, 'learningRate', 'lr') or 1e-3
  local lrd = opt(config, 'learningRateDecay') or 0
  local mom = opt(config, 'momentum') or 0
  local damp = opt(config, 'dampening') or 0
  local wd = opt(config, 'weightDecay', 'weight_decay') or 0
  local nesterov = opt(config, 'nesterov') and true or false
  if nesterov and (mom <= 0 or damp ~= 0) then
    error(fn .. ': nesterov momentum needs momentum > 0 and dampening = 0', 2)
  end
  local fx, dfdx = feval(x)
  check_step_args(fn, x, dfdx)
  local n = state.evalCounter or 0
  local clr = lr / (1 + n * lrd)
  local buf, first = nil, false
  if mom ~= 0 then buf, first = state_buffer(state, 'momentum_buf', x) end
  fa.check(C.fa_sgd_step(x.desc, dfdx.desc, buf and buf.desc or nil, clr, mom, damp, wd, nesterov and 1 or 0,
                         first and 1 or 0), 2)
  state.evalCounter = n + 1
  return x, { fx }
end

---------------------------------------------------------------------------- Adam, AdamW
local function adam(fn, decoupled, default_wd, feval, x, config, state)
  config = config or {}
  state = state or config
  local lr = opt(config, 'learningRate', 'lr') or 1e-3
  local betas = config.betas or {}
  local b1 = opt(config, 'beta1') or betas[1] or 0.9
  local b2 = opt(config, 'beta2') or betas[2] or 0.999
  local eps = opt(config, 'epsilon', 'eps') or 1e-8
  local wd = opt(config, 'weightDecay', 'weight_decay') or default_wd
  if b1 < 0 or b1 >= 1 or b2 < 0 or b2 >= 1 then
    error(string.format('%s: expected betas in [0, 1), got %s, %s', fn, tostring(b1), tostring(b2)), 3)
  end
  local fx, dfdx = feval(x)
  check_step_args(fn, x, dfdx)
  local m, fresh_m = state_buffer(state, 'm', x)
  local v, fresh_v = state_buffer(state, 'v', x)
  if fresh_m or fresh_v then -- a new run (or new parameters): both moments restart from zero
    m:zero(); v:zero(); state.t = 0
  end
  state.t = (state.t or 0) + 1
  fa.check(C.fa_adam_step(x.desc, dfdx.desc, m.desc, v.desc, lr, b1, b2, eps, wd, decoupled, state.t), 2)
  return x, { fx }
end

function optim.adam(feval, x, config, state) return adam('fa.optim.adam', 0, 0, feval, x, config, state) end
function optim.adamw(feval, x, config, state) return adam('fa.optim.adamw', 1, 1e-2, feval, x, config, state) end

---------------------------------------------------------------------------- gradient clipping
-- the sum of squares of a tensor, as a number (fa_sumsq: float64 on the CPU, float32 on CUDA)
local sumsq_out = {} -- one 1-element result per device, kept
local function sumsq(g)
  local dev = g.desc.device
  local out = sumsq_out[dev]
  if out == nil then
    out = fa.empty({}, { dtype = dev < 0 and 'float64' or 'float32', device = dev })
    sumsq_out[dev] = out
  end
  fa.check(C.fa_sumsq(out.desc, g.desc), 3)
  return out:item()
end

function optim.gradNorm(grads)
  if fa.isTensor(grads) then grads = { grads } end
  local s = 0
  for _, g in ipairs(grads) do s = s + sumsq(g) end
  return math.sqrt(s)
end

function optim.clipGradNorm(grads, maxNorm)
  if type(maxNorm) ~= 'number' or maxNorm < 0 then
    error('fa.optim.clipGradNorm: argument maxNorm: expected a non-negative number, got ' .. tostring(maxNorm), 2)
  end
  if fa.isTensor(grads) then grads = { grads } end
  if type(grads) ~= 'table' then
    error('fa.optim.clipGradNorm: argument grads: expected a tensor or a table of tensors, got ' .. type(grads), 2)
  end
  local norm = optim.gradNorm(grads)
  local coef = maxNorm / (norm + 1e-6)
  if coef < 1 then
    for _, g in ipairs(grads) do fa.check(C.fa_scale_forward(g.desc, g.desc, coef, 0), 2) end
  end
  return norm
end
optim.clip_grad_norm = optim.clipGradNorm

---------------------------------------------------------------------------- learning-rate schedules
local Schedule = {}
Schedule.__index = Schedule
function Schedule:step()
  local n = self.n or 0
  self.n = n + 1
  return self:get(n)
end

local function need(fn, o, key)
  if type(o[key]) ~= 'number' then error(string.format('%s: expected a number %s, got %s', fn, key, tostring(o[key])), 3) end
  return o[key]
end

local StepLR = setmetatable({}, { __index = Schedule })
StepLR.__index = StepLR
optim.StepLR = setmetatable(StepLR, {
  __index = Schedule,
  __call = function(_, o)
    local s = setmetatable({}, StepLR)
    s.lr = need('fa.optim.StepLR', o, 'lr')
    s.step_size = need('fa.optim.StepLR', o, 'step_size')
    s.gamma = o.gamma or 0.1
    return s
  end,
})
function StepLR:get(step) return self.lr * self.gamma ^ math.floor(step / self.step_size) end

local CosineLR = {}
CosineLR.__index = CosineLR
optim.CosineLR = setmetatable(CosineLR, {
  __index = Schedule,
  __call = function(_, o)
    local s = setmetatable({}, CosineLR)
    s.lr = need('fa.optim.CosineLR', o, 'lr')
    s.T_max = need('fa.optim.CosineLR', o, 'T_max')
    s.eta_min = o.eta_min or 0
    s.warmup = o.warmup or 0
    if s.warmup >= s.T_max and s.warmup > 0 then
      error('fa.optim.CosineLR: warmup must be shorter than T_max', 2)
    end
    return s
  end,
})
function CosineLR:get(step)
  if step < self.warmup then return self.lr * (step + 1) / self.warmup end
  local t = math.min(step - self.warmup, self.T_max - self.warmup)
  return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * t / (self.T_max - self.warmup))) / 2
end

package.loaded['fastattn.optim'] = optim
return optim
