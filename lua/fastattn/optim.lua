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
local E = require 'fastattn.errors'
local C = fa.C

local optim = {}

-- the first of the given config keys that is set (a Torch7 name and its PyTorch alias), with its name
local function opt(config, ...)
  for i = 1, select('#', ...) do
    local k = select(i, ...)
    local v = config[k]
    if v ~= nil then return v, k end
  end
  return nil, (...)
end

-- a finite number in [lo, hi] (hi_open: below hi), named 'config.<key>'
local function num(fn, key, v, lo, hi, hi_open)
  local ok = type(v) == 'number' and v == v and v > -math.huge and v < math.huge and (lo == nil or v >= lo)
             and (hi == nil or (hi_open and v < hi or not hi_open and v <= hi))
  if not ok then
    local range = lo and hi and string.format(' in [%g, %g%s', lo, hi, hi_open and ')' or ']')
                  or lo and string.format(' >= %g', lo) or ''
    E.argv(fn, 'config.' .. key, 'a finite number' .. range, v)
  end
  return v
end

local function check_step_args(fn, feval, x, dfdx)
  if not (fa.isTensor(dfdx) and dfdx:isFloatingPoint()) then
    E.fail(fn, "argument 'feval': expected it to return (loss, gradient tensor), got a gradient %s", E.describe(dfdx))
  end
  local nn = package.loaded['fastattn.nn'] -- flat tensors only come from nn's getParameters
  if nn and nn._checkFlat then nn._checkFlat(fn, x, dfdx) end
  if not x:isSameSizeAs(dfdx) then
    E.arg(fn, 'gradient', string.format('a tensor of size %s (as x)', fa._shape_str(x, 'x')), dfdx)
  end
  if dfdx.desc.dtype ~= x.desc.dtype or dfdx.desc.device ~= x.desc.device then
    E.arg(fn, 'gradient', string.format('a %s tensor on %s (as x)', x:dtype(), x:device()), dfdx)
  end
end

-- checks feval, x, config (known keys only), state; returns config, state
local function step_args(fn, known, feval, x, config, state)
  if type(feval) ~= 'function' and not (type(feval) == 'table' and getmetatable(feval) and getmetatable(feval).__call) then
    E.argv(fn, 'feval', 'a function x -> loss, gradient', feval)
  end
  E.tensor(fn, 'x', x)
  if not x:isFloatingPoint() then E.arg(fn, 'x', 'a floating-point tensor (the flat parameters)', x) end
  config = E.opts(fn, 'config', config, known)
  if state ~= nil and (type(state) ~= 'table' or fa.isTensor(state)) then E.argv(fn, 'state', 'a table or nil', state) end
  return config, state or config
end

-- a state buffer like x (zeros), kept across steps; recreated when x's shape, dtype or device changed
local function state_buffer(state, key, x)
  local b = state[key]
  if b == nil or not fa.isTensor(b) or not b:isSameSizeAs(x) or b.desc.dtype ~= x.desc.dtype
     or b.desc.device ~= x.desc.device then
    b = fa.zeros_like(x)
    state[key] = b
    return b, true
  end
  return b, false
end

local function set(...)
  local t = {}
  for _, k in ipairs({ ... }) do t[k] = true end
  return t
end

---------------------------------------------------------------------------- SGD
-- known keys: the options, and the state kept in config when no state table is given (Torch7's habit)
local SGD = set('learningRate', 'lr', 'learningRateDecay', 'momentum', 'dampening', 'weightDecay', 'weight_decay',
                'nesterov', 'evalCounter', 'momentum_buf')
function optim.sgd(feval, x, config, state)
  local fn = 'fa.optim.sgd'
  config, state = step_args(fn, SGD, feval, x, config, state)
  local v, k = opt(config, 'learningRate', 'lr')
  local lr = num(fn, k, v == nil and 1e-3 or v, 0)
  local lrd = num(fn, 'learningRateDecay', config.learningRateDecay or 0, 0)
  local mom = num(fn, 'momentum', config.momentum or 0, 0)
  local damp = num(fn, 'dampening', config.dampening or 0, 0, 1)
  v, k = opt(config, 'weightDecay', 'weight_decay')
  local wd = num(fn, k, v or 0, 0)
  local nesterov = E.boolean(fn, 'config.nesterov', config.nesterov, true) == true
  if nesterov and (mom <= 0 or damp ~= 0) then
    E.fail(fn, "argument 'config': nesterov momentum needs momentum > 0 and dampening = 0, got momentum %g, dampening %g",
           mom, damp)
  end
  local n = state.evalCounter or 0
  local fx, dfdx = feval(x)
  check_step_args(fn, feval, x, dfdx)
  local clr = lr / (1 + n * lrd)
  local buf, first = nil, false
  if mom ~= 0 then buf, first = state_buffer(state, 'momentum_buf', x) end
  E.check(C.fa_sgd_step(x.desc, dfdx.desc, buf and buf.desc or nil, clr, mom, damp, wd, nesterov and 1 or 0,
                        first and 1 or 0), fn, { grad = 'gradient', param = 'x', params = 'x' })
  state.evalCounter = n + 1
  return x, { fx }
end

---------------------------------------------------------------------------- Adam, AdamW
local ADAM = set('learningRate', 'lr', 'beta1', 'beta2', 'betas', 'epsilon', 'eps', 'weightDecay', 'weight_decay',
                 't', 'm', 'v')
local function adam(fn, decoupled, default_wd, feval, x, config, state)
  config, state = step_args(fn, ADAM, feval, x, config, state)
  local v, k = opt(config, 'learningRate', 'lr')
  local lr = num(fn, k, v == nil and 1e-3 or v, 0)
  local betas = config.betas
  if betas ~= nil and (type(betas) ~= 'table' or fa.isTensor(betas) or #betas ~= 2) then
    E.argv(fn, 'config.betas', 'a table {beta1, beta2}', betas)
  end
  betas = betas or {}
  local b1 = num(fn, config.beta1 ~= nil and 'beta1' or 'betas[1]', config.beta1 or betas[1] or 0.9, 0, 1, true)
  local b2 = num(fn, config.beta2 ~= nil and 'beta2' or 'betas[2]', config.beta2 or betas[2] or 0.999, 0, 1, true)
  v, k = opt(config, 'epsilon', 'eps')
  local eps = num(fn, k, v == nil and 1e-8 or v, 0)
  v, k = opt(config, 'weightDecay', 'weight_decay')
  local wd = num(fn, k, v == nil and default_wd or v, 0)
  if state.t ~= nil then E.integer(fn, 'state.t', state.t, 0) end
  local fx, dfdx = feval(x)
  check_step_args(fn, feval, x, dfdx)
  local m, fresh_m = state_buffer(state, 'm', x)
  local vv, fresh_v = state_buffer(state, 'v', x)
  if fresh_m or fresh_v then -- a new run (or new parameters): both moments restart from zero
    m:zero(); vv:zero(); state.t = 0
  end
  state.t = (state.t or 0) + 1
  E.check(C.fa_adam_step(x.desc, dfdx.desc, m.desc, vv.desc, lr, b1, b2, eps, wd, decoupled, state.t), fn,
          { grad = 'gradient', param = 'x', params = 'x' })
  return x, { fx }
end

function optim.adam(feval, x, config, state) return adam('fa.optim.adam', 0, 0, feval, x, config, state) end
function optim.adamw(feval, x, config, state) return adam('fa.optim.adamw', 1, 1e-2, feval, x, config, state) end

---------------------------------------------------------------------------- gradient clipping
-- the sum of squares of a tensor, as a number (fa_sumsq: float64 on the CPU, float32 on CUDA)
local sumsq_out = {} -- one 1-element result per device, kept
local function sumsq(fn, g)
  local dev = g.desc.device
  local out = sumsq_out[dev]
  if out == nil then
    out = fa.empty({}, { dtype = dev < 0 and 'float64' or 'float32', device = dev })
    sumsq_out[dev] = out
  end
  E.check(C.fa_sumsq(out.desc, g.desc), fn, { x = 'grads' })
  return out:item()
end

local function grad_list(fn, grads)
  if fa.isTensor(grads) then return { grads } end
  if type(grads) ~= 'table' then E.argv(fn, 'grads', 'a tensor or a table of tensors', grads) end
  for i, g in ipairs(grads) do
    if not (fa.isTensor(g) and g:isFloatingPoint()) then E.argv(fn, 'grads[' .. i .. ']', 'a floating-point tensor', g) end
  end
  return grads
end

function optim.gradNorm(grads)
  local fn = 'fa.optim.gradNorm'
  local s = 0
  for _, g in ipairs(grad_list(fn, grads)) do s = s + sumsq(fn, g) end
  return math.sqrt(s)
end

function optim.clipGradNorm(grads, maxNorm)
  local fn = 'fa.optim.clipGradNorm'
  if type(maxNorm) ~= 'number' or not (maxNorm >= 0) then E.argv(fn, 'maxNorm', 'a number >= 0', maxNorm) end
  grads = grad_list(fn, grads)
  local s = 0
  for _, g in ipairs(grads) do s = s + sumsq(fn, g) end
  local norm = math.sqrt(s)
  local coef = maxNorm / (norm + 1e-6)
  if coef < 1 then
    for _, g in ipairs(grads) do g:scale_(coef) end
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

local function sched_num(fn, o, key, default, lo)
  local v = o[key]
  if v == nil then v = default end
  if type(v) ~= 'number' or v ~= v or v == math.huge or v == -math.huge or (lo and v < lo) then
    E.argv(fn, key, 'a finite number' .. (lo and string.format(' >= %g', lo) or ''), v)
  end
  return v
end

local StepLR = setmetatable({}, { __index = Schedule })
StepLR.__index = StepLR
optim.StepLR = setmetatable(StepLR, {
  __index = Schedule,
  __call = function(_, o)
    local fn = 'fa.optim.StepLR'
    if o == nil then E.argv(fn, 'opts', 'a table {lr=, step_size=, gamma=}', o) end
    E.opts(fn, 'opts', o, set('lr', 'step_size', 'gamma'))
    local s = setmetatable({}, StepLR)
    s.lr = sched_num(fn, o, 'lr', nil, 0)
    s.step_size = E.integer(fn, 'step_size', o.step_size, 1)
    s.gamma = sched_num(fn, o, 'gamma', 0.1, 0)
    return s
  end,
})
function StepLR:get(step)
  E.integer('fa.optim.StepLR:get', 'step', step, 0)
  return self.lr * self.gamma ^ math.floor(step / self.step_size)
end

local CosineLR = {}
CosineLR.__index = CosineLR
optim.CosineLR = setmetatable(CosineLR, {
  __index = Schedule,
  __call = function(_, o)
    local fn = 'fa.optim.CosineLR'
    if o == nil then E.argv(fn, 'opts', 'a table {lr=, T_max=, eta_min=, warmup=}', o) end
    E.opts(fn, 'opts', o, set('lr', 'T_max', 'eta_min', 'warmup'))
    local s = setmetatable({}, CosineLR)
    s.lr = sched_num(fn, o, 'lr', nil, 0)
    s.T_max = E.integer(fn, 'T_max', o.T_max, 1)
    s.eta_min = sched_num(fn, o, 'eta_min', 0, 0)
    s.warmup = E.integer(fn, 'warmup', o.warmup == nil and 0 or o.warmup, 0)
    if s.warmup >= s.T_max and s.warmup > 0 then
      E.fail(fn, "argument 'warmup': expected fewer steps than T_max (%d), got %d", s.T_max, s.warmup)
    end
    return s
  end,
})
function CosineLR:get(step)
  E.integer('fa.optim.CosineLR:get', 'step', step, 0)
  if step < self.warmup then return self.lr * (step + 1) / self.warmup end
  local t = math.min(step - self.warmup, self.T_max - self.warmup)
  return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * t / (self.T_max - self.warmup))) / 2
end

package.loaded['fastattn.optim'] = optim
return optim
