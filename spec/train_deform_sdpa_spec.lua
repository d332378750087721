-- examples/train_deform_sdpa.lua in a short run: the multi-view denoiser with nn.DeformableSDPA trains on its
-- synthetic views and its loss falls, its offsets move toward the true matches (the fixed-coordinate baseline's do
-- not); its data (displaced views, true matches), options, make target and the two SVG files.
local fa = require 'fastattn'
local H = require 'helpers.check'

local function load_example() return H.load_example('examples/train_deform_sdpa.lua') end

describe('examples/train_deform_sdpa.lua', function()
  it('the loss falls in a short run, and the learned points approach the true matches', function()
    local ex = load_example()
    local model, o = H.assert_short_run(ex, { '--steps', '120', '--every', '0', '--plot', 'none', '--offsets', 'none' },
                                        { eval = 32, held = 0.3, window = 20, train = 0.4 })
    -- the noisy input's error is noise^2; the trained model is well below it
    math.randomseed(99); fa.manualSeed(99)
    local r = ex.evaluate(model, o, 32)
    assert.is_near(0.49, r.input, 0.03)
    assert(r.loss < 0.4 * r.input, string.format('model %.4f vs noisy input %.4f', r.loss, r.input))
    -- nearest sampling point to the true match: the learned offsets beat the initial ring (fixed coordinates)
    local x = ex.makeBatch(8, o, ex.makeFields(o))
    math.randomseed(7); fa.manualSeed(7)
    local fixed = ex.makeModel(o, true)
    fixed:forward(x)
    model:forward(x)
    local el, ef = ex.matchError(model, o), ex.matchError(fixed, o)
    assert(el < 0.5 * ef, string.format('learned %.2f px vs fixed %.2f px', el, ef))
  end)

  it('the baseline keeps its offset head: zero gradient, the same points after training', function()
    local ex = load_example()
    local o = assert(ex.parseArgs({ '--steps', '5', '--every', '0' }))
    math.randomseed(7); fa.manualSeed(7)
    local m = ex.makeModel(o, true)
    local w0, b0 = m.attn.to_offsets.weight:clone(), m.attn.to_offsets.bias:clone()
    ex.train(m, o)
    -- AdamW's decoupled weight decay still shrinks the bias by (1 - lr wd) per step at most
    assert.is_true(m.attn.to_offsets.weight:equal(w0))
    H.assert_close(m.attn.to_offsets.bias, b0, 1e-5, 0, 'offset bias')
    assert.is_false(m.attn.to_q.weight:equal(ex.makeModel(o, true).attn.to_q.weight), 'the rest trains')
  end)

  it('makes displaced views of one scene: view v at q shows the reference at q + d_v(q)', function()
    local ex = load_example()
    local o = assert(ex.parseArgs({ '--noise', '0', '--views', '3', '--size', '12', '--shift', '2' }))
    local fields = ex.makeFields(o)
    assert.are.equal(fields, ex.makeFields(o)) -- cached in o
    assert.are.same({ 0, 0, 0 }, { fields[1].tx, fields[1].ty, fields[1].a })
    for v = 2, 3 do
      local f = fields[v]
      local len = math.sqrt(f.tx ^ 2 + f.ty ^ 2)
      assert(len >= 1 and math.abs(f.tx) <= 2 and math.abs(f.ty) <= 2, 'translation ' .. len)
    end
    -- the fields depend on the seed only
    local o2 = assert(ex.parseArgs({ '--views', '3', '--size', '12', '--shift', '2' }))
    math.random(); math.random()
    assert.are.same(fields, ex.makeFields(o2))
    math.randomseed(3); fa.manualSeed(3)
    local x, t = ex.makeBatch(2, o, fields)
    assert.are.same({ 2, 3, 12, 12, 1 + 3 + 12 }, x:size())
    assert.are.same({ 2, 12, 12, 1 }, t.clean:size())
    -- no noise: the intensity feature is the clean view; view 1 is the target; one-hot views
    H.assert_close(x:select(2, 1):select(4, 1):contiguous(), t.clean:view(2, 12, 12), 1e-6, 1e-6, 'view 1')
    assert.are.same({ 0, 1, 0 }, { x:get(1, 2, 1, 1, 2), x:get(1, 2, 1, 1, 3), x:get(1, 2, 1, 1, 4) })
    -- the clean texture has about unit variance
    local var = (t.views * t.views):mean()
    assert(var > 0.4 and var < 2, 'variance ' .. var)
    -- the fixed point of the match: q + d_v(q) = p
    for v = 2, 3 do
      for y = 0, 11, 3 do
        for xx = 0, 11, 3 do
          local qx, qy = ex.match(fields, v, xx, y, 12)
          local dx, dy = ex.displacement(fields, v, qx, qy, 12)
          assert.is_near(xx, qx + dx, 1e-9)
          assert.is_near(y, qy + dy, 1e-9)
        end
      end
    end
    -- an integer translation without ripple: view 2 at q = p - (2, -1) is view 1 at p, exactly
    local shifted = { fields[1], { tx = 2, ty = -1, a = 0, px = 0, py = 0 } }
    local o3 = assert(ex.parseArgs({ '--noise', '0', '--views', '2', '--size', '12', '--shift', '2' }))
    local _, t3 = ex.makeBatch(1, o3, shifted)
    local vw = t3.views:to('float64'):table()[1]
    local n = 0
    for y = 0, 11 do
      for xx = 0, 11 do
        local qx, qy = ex.match(shifted, 2, xx, y, 12)
        assert.are.same({ xx - 2, y + 1 }, { qx, qy })
        if qx >= 0 and qy <= 11 then
          assert.are.equal(vw[1][y + 1][xx + 1], vw[2][qy + 1][qx + 1])
          n = n + 1
        end
      end
    end
    assert.are.equal(10 * 11, n)
  end)

  it('rejects bad options (parseArgs: nil and the message)', function()
    local ex = load_example()
    local function e(...) return H.arg_error(ex, ...) end
    assert.are.equal('train_deform_sdpa.lua: option --device: expected cpu or cuda, got "tpu"', e('--device', 'tpu'))
    assert.are.equal('train_deform_sdpa.lua: option --steps: expected a positive integer, got "abc"', e('--steps', 'abc'))
    assert.are.equal('train_deform_sdpa.lua: option --dim: expected a multiple of --heads (4), got 18', e('--dim', '18'))
    assert.are.equal('train_deform_sdpa.lua: unknown option --nope', e('--nope', '1'))
    local o = assert(ex.parseArgs({}))
    assert.are.same({ 400, 8, 16, 'cpu', 4, 4, 32, 4, '1' }, { o.steps, o.batch, o.size, o.device, o.views, o.samples,
                                                           o.dim, o.heads, o.baseline })
  end)

  it('writes the loss curve and the sampling points per view (SVG)', function()
    local ex = load_example()
    math.randomseed(5); fa.manualSeed(5)
    local o = assert(ex.parseArgs({ '--size', '12', '--views', '3', '--samples', '2' }))
    local model = ex.makeModel(o)
    local x, t = ex.makeBatch(1, o, ex.makeFields(o))
    local path = os.tmpname()
    ex.writeOffsets(path, model, x, t, o, 'a <title>')
    local svg = H.read_svg(path)
    assert.truthy(svg:find('a &lt;title&gt;', 1, true))
    local _, rects = svg:gsub('<rect ', '')
    local _, lines = svg:gsub('<line ', '')
    local _, crosses = svg:gsub('<path ', '')
    assert.are.equal(1 + 2 * 12 * 12, rects) -- the background and 2 panels of 12x12 pixels
    assert.are.equal(2 * 4 * 4 * 2, lines)   -- 2 views x 4x4 pixels (every 3rd) x 2 samples
    assert.are.equal(2 * 4 * 4, crosses)
    fa.util.writePlot(path, { 1, 0.5, 0.25 }, 'loss')
    H.assert_plot(path)
  end)

  it('on the command line: --help, bad options refused (exit code 1), and the make target', function()
    H.assert_example_cli('examples/train_deform_sdpa.lua', 'demo-deform-sdpa',
                         '^train_deform_sdpa%.lua: trains a multi%-view denoiser', { '--views N', '--offsets FILE' })
  end)
end)
