-- fa.optim (lua/fastattn/optim.lua): SGD / Adam / AdamW steps, gradient clipping and the learning-rate
-- schedules against PyTorch (spec/fixtures/optim.safetensors, made by spec/fixtures/gen_nn.py, float64).
local fa = require 'fastattn'
local H = require 'helpers.check'

local FX = H.fixture('optim')

-- fa's config for each PyTorch run of the fixture (Torch7 names and PyTorch names both used)
local CONFIGS = {
  sgd = { 'sgd', { learningRate = 0.1 } },
  sgd_mom = { 'sgd', { lr = 0.1, momentum = 0.9, dampening = 0.1, weightDecay = 0.01 } },
  sgd_nesterov = { 'sgd', { learningRate = 0.05, momentum = 0.8, nesterov = true, weight_decay = 0.02 } },
  adam = { 'adam', { learningRate = 0.01, weightDecay = 0.01 } },
  adamw = { 'adamw', { lr = 0.01, betas = { 0.8, 0.99 }, epsilon = 1e-6, weightDecay = 0.1 } },
}
local TOL = { float64 = { 1e-12, 1e-13 }, float32 = { 1e-5, 1e-6 } }

describe('fa.optim steps match torch.optim', function()
  local names = {}
  for k in pairs(CONFIGS) do names[#names + 1] = k end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, dtype in ipairs({ 'float64', 'float32' }) do
      it(name .. ' (' .. dtype .. '), 3 steps', function()
        local method, cfg = CONFIGS[name][1], CONFIGS[name][2]
        local config = {}
        for k, v in pairs(cfg) do config[k] = v end
        local state = {}
        local x = FX.p0:to(dtype):clone() -- never the fixture itself (to() returns self for float64)
        local grad = fa.zeros_like(x)
        local rtol, atol = TOL[dtype][1], TOL[dtype][2]
        for step = 1, 3 do
          local calls = 0
          local function feval(p)
            assert.are.equal(x, p)
            calls = calls + 1
            grad:copy(FX['g' .. step])
            return 1.5 * step, grad
          end
          local xr, fx = fa.optim[method](feval, x, config, state)
          assert.are.equal(1, calls)
          assert.are.equal(x, xr)
          assert.are.same({ 1.5 * step }, fx)
          H.assert_close(x, FX[name .. '.step' .. step], rtol, atol, name .. ' step ' .. step)
        end
      end)
    end
  end

  it('keeps its state in config when no state table is given (Torch7)', function()
    local x = FX.p0:clone()
    local config = { learningRate = 0.01, weightDecay = 0.01 }
    for step = 1, 3 do
      fa.optim.adam(function() return 0, FX['g' .. step] end, x, config)
    end
    assert.are.equal(3, config.t)
    H.assert_close(x, FX['adam.step3'], 1e-12, 1e-13, 'adam with state in config')
  end)

  -- each row: a call on this file's line and the whole message (anchored at this file: the caller's line)
  local function q(m) return (m:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end
  local x = fa.zeros(4)
  local function fe() return 0, fa.zeros(4) end
  local rows = {
    { function() fa.optim.sgd(function() return 0, fa.zeros(5) end, x, { lr = 0.1 }) end,
      "fa.optim.sgd: argument 'gradient': expected a tensor of size 4 (as x), got a float32 tensor of size 5" },
    { function() fa.optim.adamw(function() return 0 end, x, {}) end,
      "fa.optim.adamw: argument 'feval': expected it to return (loss, gradient tensor), got a gradient nil" },
    { function() fa.optim.sgd(fe, x, { nesterov = true }) end,
      "fa.optim.sgd: argument 'config': nesterov momentum needs momentum > 0 and dampening = 0, got momentum 0, dampening 0" },
    { function() fa.optim.sgd(fe, x, { lr = 'abc' }) end, 'fa.optim.sgd: argument \'config.lr\': expected a finite number >= 0, got "abc"' },
    { function() fa.optim.adam(fe, x, { learningRate = -1 }) end,
      "fa.optim.adam: argument 'config.learningRate': expected a finite number >= 0, got -1" },
    { function() fa.optim.adamw(fe, x, { lr = 0 / 0 }) end, "fa.optim.adamw: argument 'config.lr': expected a finite number >= 0, got nan" },
    { function() fa.optim.sgd(fe, x, { weightDecay = -0.1 }) end,
      "fa.optim.sgd: argument 'config.weightDecay': expected a finite number >= 0, got -0.1" },
    { function() fa.optim.adamw(fe, x, { weight_decay = 'x' }) end,
      'fa.optim.adamw: argument \'config.weight_decay\': expected a finite number >= 0, got "x"' },
    { function() fa.optim.adam(fe, x, { betas = { 1, 0.9 } }) end,
      "fa.optim.adam: argument 'config.betas[1]': expected a finite number in [0, 1), got 1" },
    { function() fa.optim.adam(fe, x, { beta2 = -0.5 }) end, "fa.optim.adam: argument 'config.beta2': expected a finite number in [0, 1), got -0.5" },
    { function() fa.optim.adam(fe, x, { betas = 0.5 }) end, "fa.optim.adam: argument 'config.betas': expected a table {beta1, beta2}, got 0.5" },
    { function() fa.optim.adam(fe, x, { eps = -1 }) end, "fa.optim.adam: argument 'config.eps': expected a finite number >= 0, got -1" },
    { function() fa.optim.sgd(fe, x, { momentum = -0.5 }) end, "fa.optim.sgd: argument 'config.momentum': expected a finite number >= 0, got -0.5" },
    { function() fa.optim.sgd(fe, x, { momentum = 0.9, dampening = 2 }) end,
      "fa.optim.sgd: argument 'config.dampening': expected a finite number in [0, 1], got 2" },
    { function() fa.optim.sgd(fe, x, { nesterov = 1 }) end, "fa.optim.sgd: argument 'config.nesterov': expected true or false, got 1" },
    { function() fa.optim.sgd(fe, x, { learningrate = 0.1 }) end,
      'fa.optim.sgd: argument \'config\': unknown option "learningrate" (known: dampening, evalCounter, learningRate, learningRateDecay, lr, momentum, momentum_buf, nesterov, weightDecay, weight_decay)' },
    { function() fa.optim.adam(fe, x, { momentum = 0.9 }) end,
      'fa.optim.adam: argument \'config\': unknown option "momentum" (known: beta1, beta2, betas, eps, epsilon, learningRate, lr, m, t, v, weightDecay, weight_decay)' },
    { function() fa.optim.adam(fe, x, 0.25) end, "fa.optim.adam: argument 'config': expected a table of options or nil, got 0.25" },
    { function() fa.optim.adam(5, x) end, "fa.optim.adam: argument 'feval': expected a function x -> loss, gradient, got 5" },
    { function() fa.optim.sgd(fe, { x }) end, "fa.optim.sgd: argument 'x': expected a tensor, got a table" },
    { function() fa.optim.sgd(function() return 0, fa.zeros(4):double() end, x) end,
      "fa.optim.sgd: argument 'gradient': expected a float32 tensor on cpu (as x), got a float64 tensor of size 4" },
    { function() fa.optim.clipGradNorm(x, -1) end, "fa.optim.clipGradNorm: argument 'maxNorm': expected a number >= 0, got -1" },
    { function() fa.optim.clipGradNorm({ x, 3 }, 1) end, "fa.optim.clipGradNorm: argument 'grads[2]': expected a floating-point tensor, got 3" },
    { function() fa.optim.StepLR { lr = 0.1 } end, "fa.optim.StepLR: argument 'step_size': expected an integer >= 1, got nil" },
    { function() fa.optim.StepLR { lr = 'a', step_size = 2 } end, 'fa.optim.StepLR: argument \'lr\': expected a finite number >= 0, got "a"' },
    { function() fa.optim.CosineLR { lr = 0.1, T_max = 10, warmup = 10 } end,
      "fa.optim.CosineLR: argument 'warmup': expected fewer steps than T_max (10), got 10" },
    { function() fa.optim.CosineLR { lr = 0.1, T_max = 10, warump = 1 } end,
      'fa.optim.CosineLR: argument \'opts\': unknown option "warump" (known: T_max, eta_min, lr, warmup)' },
    { function() fa.optim.CosineLR { lr = 0.1, T_max = 10 }:get(1.5) end,
      "fa.optim.CosineLR:get: argument 'step': expected an integer >= 0, got 1.5" },
  }
  for i, r in ipairs(rows) do
    it('names bad arguments, row ' .. i .. ': ' .. r[2]:sub(1, 50), function()
      local ok, e = pcall(r[1])
      assert.is_false(ok, 'expected an error')
      local pat = '^spec/optim_spec%.lua:%d+: ' .. q(r[2]) .. '$'
      assert.truthy(tostring(e):find(pat), string.format('\n got:  %s\n want: %s', tostring(e), pat))
    end)
  end

  it('a rejected config changes nothing', function()
    local p = fa.ones(4)
    local config = { lr = 0.1, momentum = -1 }
    assert.is_false(pcall(fa.optim.sgd, function() return 0, fa.ones(4) end, p, config))
    assert.are.equal(4, p:sum())
    assert.is_nil(config.evalCounter)
  end)
end)

describe('fa.optim.clipGradNorm', function()
  it('matches torch.nn.utils.clip_grad_norm_', function()
    for _, dtype in ipairs({ 'float64', 'float32' }) do
      local a, b = FX['clip.a']:to(dtype):clone(), FX['clip.b']:to(dtype):clone()
      local norm = fa.optim.clipGradNorm({ a, b }, 1.0)
      assert.is_near(FX['clip.norm']:item(), norm, 1e-6)
      H.assert_close(a, FX['clip.a_clipped'], 1e-6, 1e-7, 'a')
      H.assert_close(b, FX['clip.b_clipped'], 1e-6, 1e-7, 'b')
    end
  end)

  it('leaves gradients under the limit alone and takes a flat tensor', function()
    local g = FX['clip.a']:clone()
    local norm = fa.optim.clipGradNorm(g, 1e6)
    assert.is_true(g:equal(FX['clip.a']))
    local s = 0
    for _, v in ipairs(FX['clip.a']:view(-1):table()) do s = s + v * v end
    assert.is_near(math.sqrt(s), norm, 1e-12)
  end)
end)

describe('learning-rate schedules', function()
  it('StepLR matches torch.optim.lr_scheduler.StepLR', function()
    local s = fa.optim.StepLR{ lr = 0.5, step_size = 4, gamma = 0.3 }
    local ref = FX.steplr:table()
    for k = 0, #ref - 1 do assert.is_near(ref[k + 1], s:get(k), 1e-12) end
    for k = 0, #ref - 1 do assert.is_near(ref[k + 1], s:step(), 1e-12) end
  end)

  it('CosineLR matches CosineAnnealingLR, with a linear warm-up when asked', function()
    local s = fa.optim.CosineLR{ lr = 0.5, T_max = 10, eta_min = 0.01 }
    local ref = FX.cosinelr:table()
    for k = 0, 10 do assert.is_near(ref[k + 1], s:get(k), 1e-12) end
    assert.is_near(0.01, s:get(50), 1e-12)
    local w = fa.optim.CosineLR{ lr = 1, T_max = 12, warmup = 4 }
    assert.is_near(0.25, w:get(0), 1e-12)
    assert.is_near(1.0, w:get(3), 1e-12)
    assert.is_near(1.0, w:get(4), 1e-12)
    assert.is_near(0.5, w:get(8), 1e-12)
    assert.is_near(0.0, w:get(12), 1e-12)
  end)
end)

require('helpers.op').describe_gpu('fa.optim on the GPU', function()
  it('sgd_nesterov, adam and adamw steps match torch.optim on cuda (float32)', function()
    for _, name in ipairs({ 'sgd_nesterov', 'adam', 'adamw' }) do
      local method, cfg = CONFIGS[name][1], CONFIGS[name][2]
      local config, state = {}, {}
      for k, v in pairs(cfg) do config[k] = v end
      local x = FX.p0:float():cuda()
      local grad = fa.zeros_like(x)
      for step = 1, 3 do
        fa.optim[method](function() grad:copy(FX['g' .. step]); return 0, grad end, x, config, state)
        assert.are.equal('cuda:0', x:device())
        H.assert_close(x, FX[name .. '.step' .. step], 1e-5, 1e-6, name .. ' step ' .. step)
      end
    end
  end)
  it('clipGradNorm on cuda', function()
    local a, b = FX['clip.a']:float():cuda(), FX['clip.b']:float():cuda()
    assert.is_near(FX['clip.norm']:item(), fa.optim.clipGradNorm({ a, b }, 1.0), 1e-5)
    H.assert_close(a, FX['clip.a_clipped'], 1e-5, 1e-6, 'a')
    H.assert_close(b, FX['clip.b_clipped'], 1e-5, 1e-6, 'b')
  end)
end)
