// A virtualised list with a fixed row height: only the rows in view (plus a few either
// side) are in the DOM, so a run of 100,000 events costs a few dozen nodes. While the
// view is scrolled to the bottom it follows new rows (a live tail); scrolling up stops
// following until the bottom is reached again.
import type { ComponentChildren } from "preact";
import { useLayoutEffect, useRef, useState } from "preact/hooks";

const OVERSCAN = 8;

interface Props {
  count: number;
  rowHeight: number;
  height: number;
  renderRow: (index: number) => ComponentChildren;
  /** Changes whenever rows change without `count` changing (e.g. a collapsed row grows). */
  version?: number;
}

export function VirtualList({ count, rowHeight, height, renderRow, version }: Props) {
  const box = useRef<HTMLDivElement>(null);
  const [scrollTop, setScrollTop] = useState(0);
  const follow = useRef(true);

  useLayoutEffect(() => {
    const el = box.current;
    if (el && follow.current) {
      el.scrollTop = el.scrollHeight;
      setScrollTop(el.scrollTop);
    }
  }, [count, version]);

  const onScroll = () => {
    const el = box.current;
    if (!el) return;
    follow.current = el.scrollTop + el.clientHeight >= el.scrollHeight - rowHeight;
    setScrollTop(el.scrollTop);
  };

  const first = Math.max(0, Math.floor(scrollTop / rowHeight) - OVERSCAN);
  const last = Math.min(count, Math.ceil((scrollTop + height) / rowHeight) + OVERSCAN);
  const rows = [];
  for (let i = first; i < last; i++) {
    rows.push(
      <div class="vrow" key={i} data-index={i} style={{ top: `${i * rowHeight}px`, height: `${rowHeight}px` }}>
        {renderRow(i)}
      </div>,
    );
  }
  return (
    <div class="vlist" ref={box} onScroll={onScroll} style={{ height: `${height}px` }} data-rows={count}>
      <div class="vlist-inner" style={{ height: `${count * rowHeight}px` }}>
        {rows}
      </div>
    </div>
  );
}
