-- moonshard.arena: tensors that live and die together. A model's activation buffers, a KV
-- cache, the views made of them: each is made through the arena that owns it and freed by its
-- explicit close(), not by the garbage collector (whose finalizers are only a safety net).
--
--   local a = arena.new("cuda:0")
--   local x = assert(a:tensor({ 64, 4096 }, "f32"))
--   local row = a:keep(x:narrow(1, 0, 1))   -- a view, freed with the arena
--   a:close()                               -- every tensor and view above is released now
local tensor = require "moonshard.tensor"

local M = {}
local Arena = {}
Arena.__index = Arena

-- M.new(device, opts?) -> arena. opts.alloc(shape, dtype) -> tensor | nil, message replaces
-- tensor.new on the device (a pool's buffers: moonshard.kv_offload); opts.on_close() runs after
-- close has freed the tensors (the pool itself goes then).
function M.new(device, opts)
  opts = opts or {}
  return setmetatable({ device = device or "cpu", list = {}, bytes = 0, alloc = opts.alloc, on_close = opts.on_close },
    Arena)
end

-- a:tensor(shape, dtype?) -> tensor (f32 by default, on the arena's device) | nil, message
function Arena:tensor(shape, dtype)
  local t, err
  if self.alloc then
    t, err = self.alloc(shape, dtype or "f32")
  else
    t, err = tensor.new(shape, dtype or "f32", self.device)
  end
  if not t then return nil, err end
  self.list[#self.list + 1] = t
  self.bytes = self.bytes + t:nbytes()
  return t
end

-- a:keep(t) -> t: a view (or any tensor) the arena frees when it closes.
function Arena:keep(t)
  if t then self.list[#self.list + 1] = t end
  return t
end

-- Frees every tensor and view made through the arena; it is empty (and usable) afterwards.
function Arena:close()
  local list = self.list
  for i = #list, 1, -1 do list[i]:free() end
  self.list, self.bytes = {}, 0
  if self.on_close then self.on_close() end
end

return M
