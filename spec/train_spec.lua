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

-- runs `bin/fastattn examples/train_convnet.lua <args>`: its output (stdout and stderr) and exit code
local function run(args) return H.run_script('examples/train_convnet.lua', args) end

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

  it('examples/train_convnet.lua: options checked before training, --help, the plot, and its make target', function()
    local ex = H.load_example('examples/train_convnet.lua')
    local function e(...) local o, err = ex.parseArgs({ ... }); assert.is_nil(o); return err end
    assert.are.equal('train_convnet.lua: option --steps: expected a positive integer, got "abc"', e('--steps', 'abc'))
    assert.are.equal('train_convnet.lua: option --batch: expected a positive integer, got "0"', e('--batch', '0'))
    assert.are.equal('train_convnet.lua: option --lr: expected a positive number, got "-1"', e('--lr', '-1'))
    assert.are.equal('train_convnet.lua: unknown option --size', e('--size', '3'))
    assert.are.equal('train_convnet.lua: option --plot: cannot write "/no/such/dir/c.svg": No such file or directory',
                     e('--plot', '/no/such/dir/c.svg'))
    local o = assert(ex.parseArgs({}))
    assert.are.same({ 300, 64, 3e-3, 'cpu', 1000 }, { o.steps, o.batch, o.lr, o.device, o.test })

    local out, code = run('--help')
    assert.are.equal(0, code)
    assert.matches('^train_convnet%.lua: trains a small conv net', out)
    assert(out:find('`make demo-convnet` runs it', 1, true), out)
    out, code = run('--steps 10 --batch 0')
    assert.are.equal(1, code)
    assert.are.equal('train_convnet.lua: option --batch: expected a positive integer, got "0"\n' ..
                     'usage: bin/fastattn examples/train_convnet.lua [options]  (--help lists the options)\n', out)

    local path = os.tmpname()
    out, code = run('--steps 3 --batch 4 --test 8 --every 1 --plot ' .. path)
    assert.are.equal(0, code, out)
    assert(out:find('trained 3 steps of 4 images', 1, true), out)
    assert(out:find('loss curve written to ' .. path, 1, true), out)
    H.assert_plot(path)

    H.assert_demo_target('demo-convnet', 'examples/train_convnet.lua')
    local src = assert(io.open('examples/train_convnet.lua')):read('*a')
    assert.is_nil(src:match('^(.-)\nlocal '):find('`make demo` runs it', 1, true))
  end)
end)
