-- End-to-end training: a small conv net learns to tell horizontal from vertical bars (12x12 images made
-- here) with fa.optim.adamw, and examples/train_convnet.lua trains for a few steps; the losses must fall.
local ffi = require 'ffi'
local fa = require 'fastattn'
local H = require 'helpers.check'
local nn = fa.nn

-- n noisy 12x12 images, each a horizontal (class 1) or vertical (class 2) bar of random position and length
local function bars(n)
  local S = 12
  local x = fa.randn(n, 1, S, S):scale_(0.2)
  local y = fa.empty(n, 'int64')
  local px, py = ffi.cast('float*', x.desc.data), ffi.cast('int64_t*', y.desc.data)
  for i = 0, n - 1 do
    local cls = math.random(2)
    py[i] = cls
    local a, len = math.random(0, S - 1), math.random(5, 9)
    local b = math.random(0, S - len)
    for k = 0, len - 1 do
      local r, c = a, b + k
      if cls == 2 then r, c = b + k, a end
      px[i * S * S + r * S + c] = px[i * S * S + r * S + c] + 1
    end
  end
  return x, y
end

-- mean cross-entropy of the model on a fixed batch (evaluate mode)
local function eval_loss(model, crit, x, y)
  model:evaluate()
  local l = crit:forward(model:forward(x), y)
  model:training()
  return l
end

describe('training', function()
  it('a conv net learns horizontal vs vertical bars with AdamW', function()
    math.randomseed(3)
    fa.manualSeed(3)
    local model = nn.Sequential(
      nn.Conv2d(1, 6, 3, 1, 1), nn.ReLU(),
      nn.Conv2d(6, 8, 3, 2, 1), nn.GELU(),   -- 6x6
      nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    local crit = nn.CrossEntropyCriterion()
    local params, grads = model:getParameters()
    local ex, ey = bars(200)
    local initial = eval_loss(model, crit, ex, ey)
    local config, state = { learningRate = 1e-2, weightDecay = 1e-4 }, {}
    for _ = 1, 40 do
      local x, y = bars(32)
      fa.optim.adamw(function()
        grads:zero()
        local out = model:forward(x)
        local loss = crit:forward(out, y)
        model:backward(x, crit:backward(out, y))
        return loss, grads
      end, params, config, state)
    end
    local final = eval_loss(model, crit, ex, ey)
    assert(final < 0.5 * initial, string.format('loss did not fall enough: %.4f -> %.4f', initial, final))
    -- and it classifies the held-out batch
    model:evaluate()
    local pred = model:forward(ex):argmax(2):view(-1):table()
    local right = 0
    for i, c in ipairs(ey:table()) do if pred[i] == c then right = right + 1 end end
    assert(right / 200 > 0.9, 'accuracy ' .. right / 200)
  end)

  it('examples/train_convnet.lua: the loss falls in a few steps', function()
    local ex = H.load_example('examples/train_convnet.lua')
    math.randomseed(5)
    fa.manualSeed(5)
    local model = ex.makeModel()
    local crit = nn.CrossEntropyCriterion()
    local tx, ty = ex.makeBatch(200)
    local initial = eval_loss(model, crit, tx, ty)
    local losses = ex.train(model, { steps = 120, batch = 48, lr = 3e-3, every = 0, clip = 1.0 })
    assert.are.equal(120, #losses)
    local final = eval_loss(model, crit, tx, ty)
    assert(final < 0.7 * initial, string.format('loss did not fall: %.4f -> %.4f', initial, final))
    assert.is_true(ex.accuracy(model, tx, ty) > 0.5)
  end)
end)
