import React from 'react';

import { budgetText, chartBars, dayLabel, IBudget, IDaySpend, ISpend, todaySpend } from '../model';
import { Budgets, SpendChart } from '../spendChart';

// react-dom ships no types here; its server renderer is all these tests need.
const { renderToStaticMarkup } = jest.requireActual<{ renderToStaticMarkup(e: React.ReactElement): string }>(
  'react-dom/server'
);

/** 14 days ending 2026-11-24, spend on three of them. */
function fortnight(): IDaySpend[] {
  const spent: Record<number, number> = { 12: 0.5, 20: 2, 24: 1 };
  return Array.from({ length: 14 }, (_, i) => {
    const d = 11 + i;
    return { day: `2026-11-${d}`, usd: spent[d] ?? 0 };
  });
}

/** The rendered markup's <rect> elements' attributes, in order. */
function rects(html: string): Record<string, string>[] {
  return [...html.matchAll(/<rect ([^>]*)>/g)].map(m =>
    Object.fromEntries([...m[1].matchAll(/([\w-]+)="([^"]*)"/g)].map(a => [a[1], a[2]]))
  );
}

const budget = (over: Partial<IBudget> = {}): IBudget => ({
  scope: 'you, today',
  limit_usd: 1,
  spent_usd: 0.25,
  left_usd: 0.75,
  ...over
});

describe('the spend chart', () => {
  it('draws one bar per day, the largest day full height, days without spend as stubs', () => {
    const html = renderToStaticMarkup(<SpendChart days={fortnight()} />);
    const bars = rects(html);
    expect(bars).toHaveLength(14);
    expect(bars.map(b => b['data-day'])).toEqual(fortnight().map(d => d.day));
    const height = (day: string) => Number(bars.find(b => b['data-day'] === day)!.height);
    expect(height('2026-11-20')).toBe(40);
    expect(height('2026-11-24')).toBe(20);
    expect(height('2026-11-12')).toBe(10);
    expect(height('2026-11-13')).toBe(1);
    // Bars stand on the baseline, left to right.
    expect(bars.every(b => Number(b.y) + Number(b.height) === 40)).toBe(true);
    const xs = bars.map(b => Number(b.x));
    expect(xs).toEqual([...xs].sort((a, b) => a - b));
    // Zero days and today are told apart by class, coloured by Lab's variables in CSS.
    expect(bars.filter(b => b.class.includes('jp-mod-zero'))).toHaveLength(11);
    expect(bars.filter(b => b.class.includes('jp-mod-today')).map(b => b['data-day'])).toEqual(['2026-11-24']);
    expect(html).not.toMatch(/fill=|style=/); // no colours of its own: the theme's
  });

  it('labels each bar and the chart for people, not only for eyes', () => {
    const html = renderToStaticMarkup(<SpendChart days={fortnight()} />);
    expect(html).toContain('<title>Nov 20: $2.00</title>');
    expect(html).toContain('<title>Nov 13: $0.0000</title>');
    expect(html).toContain('role="img" aria-label="Spend per day, Nov 11 to Nov 24: highest $2.00"');
    expect(html).toContain('<span>Nov 11</span><span>max $2.00/day</span><span>Nov 24</span>');
  });

  it('draws nothing for no days, and flat stubs for days without spend', () => {
    expect(renderToStaticMarkup(<SpendChart days={[]} />)).toBe('');
    const idle = fortnight().map(d => ({ ...d, usd: 0 }));
    expect(chartBars(idle, 40).map(b => b.height)).toEqual(Array(14).fill(1));
  });

  it('shows each budget with what is left, and says when none is', () => {
    const html = renderToStaticMarkup(
      <Budgets budgets={[budget(), budget({ scope: 'everyone, this month', spent_usd: 120, left_usd: 0, limit_usd: 100 })]} />
    );
    expect(html).toContain('data-over="false">Budget (you, today): $0.7500 left of $1.00</li>');
    expect(html).toContain('data-over="true">Budget (everyone, this month): $120.00 of $100.00, none left</li>');
    expect(renderToStaticMarkup(<Budgets budgets={[]} />)).toBe('');
  });
});

describe('spend words', () => {
  it('dates days as the host gave them', () => {
    expect(dayLabel('2026-01-05')).toBe('Jan 5');
    expect(dayLabel('not a day')).toBe('not a day');
  });
  it("takes today's spend from the daemon, else the window's last day", () => {
    const spend: ISpend = { since: 0, now: 0, total_usd: 3.5, notebooks: [], days: fortnight() };
    expect(todaySpend({ ...spend, today_usd: 0.5 })).toBe(0.5);
    expect(todaySpend(spend)).toBe(1);
    expect(todaySpend({ ...spend, days: [] })).toBe(0);
  });
  it('words a budget', () => {
    expect(budgetText(budget())).toBe('Budget (you, today): $0.7500 left of $1.00');
  });
});
