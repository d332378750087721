-- examples/train_msda.lua in a short run: the Deformable-DETR-style model (conv backbone, 4 levels, an
-- nn.MSDeformAttn encoder layer, per-cell heads) trains on its synthetic disc images and its loss falls.
local fa = require 'fastattn'
local H = require 'helpers.check'

local function load_example() return H.load_example('examples/train_msda.lua') end

describe('examples/train_msda.lua', function()
  it('the loss falls in a short run (size 32: levels 8x8, 4x4, 2x2, 1x1)', function()
    local ex = load_example()
    local o = ex.parseArgs({ '--size', '32', '--steps', '80', '--batch', '16', '--lr', '3e-3', '--every', '0',
                             '--d_model', '16', '--heads', '2', '--points', '2' })
    math.randomseed(7)
    fa.manualSeed(7)
    local model = ex.makeModel(o)
    -- the held-out loss before and after, on the same images (same seeds)
    math.randomseed(1234); fa.manualSeed(1234)
    local before = ex.evaluate(model, o, 64)
    math.randomseed(7); fa.manualSeed(7)
    local losses = ex.train(model, o)
    assert.are.equal(80, #losses)
    math.randomseed(1234); fa.manualSeed(1234)
    local after = ex.evaluate(model, o, 64)
    assert(after.loss < 0.6 * before.loss,
           string.format('held-out loss did not fall enough: %.4f -> %.4f', before.loss, after.loss))
    local first, last = 0, 0
    for i = 1, 10 do first, last = first + losses[i], last + losses[#losses - 10 + i] end
    assert(last < 0.7 * first, string.format('training loss did not fall: %.4f -> %.4f', first / 10, last / 10))
    for _, l in ipairs(losses) do assert(l == l and l < math.huge, 'loss is not finite') end
  end)

  it('makes discs of the requested radius range and writes the SVG plot', function()
    local ex = load_example()
    math.randomseed(3); fa.manualSeed(3)
    local x, t = ex.makeBatch(50, 64, 0)
    assert.are.same({ 50, 1, 64, 64 }, x:size())
    for i = 1, 50 do
      assert(t.r[i] >= 1 and t.r[i] <= 12, 'radius ' .. t.r[i])
      assert(t.cls[i] >= 1 and t.cls[i] <= 3)
      -- the disc is bright at its centre pixel and the background is 0 (no noise asked)
      local c = x:get(i, 1, math.floor(t.cy[i]) + 1, math.floor(t.cx[i]) + 1)
      assert(c > 0.3, 'centre pixel ' .. c)
    end
    local path = os.tmpname()
    ex.writePlot(path, { 3, 2.5, 2, 1.2, 1.1, 0.9 }, 'test')
    local f = assert(io.open(path))
    local svg = f:read('*a')
    f:close()
    os.remove(path)
    assert.matches('^<svg', svg)
    assert.matches('polyline', svg)
    assert.matches('</svg>', svg)
  end)

  it('rejects bad arguments', function()
    local ex = load_example()
    assert.has_error(function() ex.parseArgs({ '--size', '40' }) end,
                     'train_msda: --size must be a multiple of 32 (4 levels, stride 32)')
    assert.has_error(function() ex.parseArgs({ '--device', 'tpu' }) end, 'train_msda: --device must be cpu or cuda')
    local ok, err = pcall(ex.parseArgs, { '--nope', '1' })
    assert.is_false(ok)
    assert.matches('unknown argument %-%-nope', err)
  end)
end)

describe('examples/train_msda.lua on the GPU #gpu', function()
  if fa.C.fa_cuda_device_count() < 1 then
    it('skips: no CUDA device found', function() pending('no CUDA device found') end)
    return
  end
  it('the loss falls in a short run with --device cuda', function()
    local ex = load_example()
    local o = ex.parseArgs({ '--size', '64', '--steps', '80', '--batch', '32', '--lr', '3e-3', '--every', '0',
                             '--device', 'cuda' })
    math.randomseed(7)
    fa.manualSeed(7)
    local model = ex.makeModel(o):cuda()
    math.randomseed(1234); fa.manualSeed(1234)
    local before = ex.evaluate(model, o, 64)
    math.randomseed(7); fa.manualSeed(7)
    ex.train(model, o)
    assert.are.equal('cuda:0', model.head.weight:device())
    math.randomseed(1234); fa.manualSeed(1234)
    local after = ex.evaluate(model, o, 64)
    assert(after.loss < 0.6 * before.loss,
           string.format('held-out loss did not fall enough: %.4f -> %.4f', before.loss, after.loss))
  end)
end)
